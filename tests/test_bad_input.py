"""Bad models, weights and data met while loading: one error line naming what is wrong, exit
code 2, before any evaluation or training."""
import json
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import ats_vit
from conftest import one_error_line, run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A ResNet's weights with their metadata, weights of the wrong shape, broken metadata."""
    folder = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), str(folder / "resnet.safetensors"))
    (folder / "resnet.json").write_text(json.dumps({"model": "resnet18"}))
    wide = timm.create_model("vit_fmnist_patch2_28", embed_dim=96, num_heads=3)
    save_file(wide.state_dict(), str(folder / "wide.safetensors"))
    for name, meta in [("broken", "{oops"), ("nameless", '{"arch": "vit_fmnist_patch2_28"}'), ("number", '{"model": 3}')]:
        save_file(timm.create_model("vit_fmnist_patch2_28").state_dict(), str(folder / f"{name}.safetensors"))
        (folder / f"{name}.json").write_text(meta)
    return folder


@pytest.mark.parametrize("command", ["eval", "ablate", "finetune"])
@pytest.mark.parametrize("weights,match", [
    ("resnet.safetensors", "must be a timm VisionTransformer .* got ResNet"),
    ("broken.safetensors", "broken.json must be JSON naming the timm model.*JSONDecodeError"),
    ("nameless.safetensors", "nameless.json must be JSON naming the timm model.*KeyError"),
    ("number.safetensors", 'the "model" of .*number.json must be a timm model name, got 3'),
])
def test_bad_model_files_are_one_line(files, command, weights, match, tmp_path, capsys):
    code, out, err = run([command, "--model", str(files / weights), "--limit", "8", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and one_error_line(err), err
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_an_unsupported_timm_name_is_refused_before_fetching_weights(capsys):
    code, _, err = run(["eval", "--model", "resnet18", "--limit", "8"], capsys)
    assert code == 2 and one_error_line(err) and "got ResNet" in err
    assert "pretrained weights" not in err  # refused from the architecture alone: no hub


def test_weights_of_the_wrong_shape_name_the_key_and_both_shapes(files, capsys):
    code, _, err = run(["eval", "--model", "vit_fmnist_patch2_28", "--checkpoint", str(files / "wide.safetensors")],
                       capsys)
    assert code == 2 and one_error_line(err), err
    assert "size mismatch for " in err and "size mismatch for cls_token" in err and "[1, 1, 96]" in err and "[1, 1, 48]" in err, err


@pytest.mark.parametrize("command", ["eval", "ablate", "finetune"])
def test_a_checkpoint_with_other_classes_than_the_data_is_refused(command, tiny_checkpoint, tmp_path, capsys):
    """A label is an index into the head: 10 labels against 3 outputs would be scored wrongly."""
    code, _, err = run([command, "--model", str(tiny_checkpoint), "--limit", "8", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and one_error_line(err) and "--data has 10 classes but the model's head has 3" in err, err


@pytest.mark.parametrize("command", ["eval", "ablate"])
def test_a_folder_with_other_classes_than_the_model_is_refused(command, image_folder, tmp_path, capsys):
    code, _, err = run([command, "--data", str(image_folder), "--limit", "8", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and one_error_line(err) and "--data has 3 classes but the model's head has 10" in err, err


def test_apply_refuses_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = timm.create_model("vit_fmnist_patch2_28")
    with pytest.raises(ValueError, match="meta device"):
        ats_vit.apply(model)
    assert not ats_vit.is_patched(model)


def test_dynamicvit_evaluation_needs_trained_predictors(capsys):
    """The bundled model has no predictors: fresh ones would only guess, so eval refuses."""
    code, _, err = run(["eval", "--reducer", "dynamicvit", "--num-tokens", "0.7", "--limit", "8"], capsys)
    assert code == 2 and one_error_line(err) and "needs a model with trained predictors" in err


@pytest.mark.parametrize("command", ["eval", "finetune"])
def test_an_unknown_reducer_is_one_line(command, capsys):
    code, _, err = run([command, "--reducer", "tome2", "--limit", "8"], capsys)
    assert code == 2 and one_error_line(err) and "--reducer must be one of ['ats', 'dynamicvit']" in err
