"""ImageNet synset folders, and the real pretrained ViT-Ti of ``../shared/imagenet`` (skipped, with
the reason, where that folder is absent: a user's clone)."""
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo

import ats_vit
from ats_vit.jobs.data import ImageFolder
from ats_vit.jobs.errors import UserError
from ats_vit.jobs.loading import load_dataset, load_model
from conftest import one_error_line, run
from reference import reference_forward

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "imagenet"
WEIGHTS = SHARED / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
needs_imagenet = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"needs the real ViT-Ti and images in {SHARED}")
SYNSETS = ImageNetInfo().label_names()


def _images(root: Path, folders, per_folder: int = 2, nested: bool = False):
    rng = np.random.default_rng(0)
    for name in folders:
        where = root / name / ("deeper" if nested else "")
        where.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            pixels = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(where / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def imagenet_head():
    """A 1000-class ViT with random weights: the labelling, not the accuracy, is under test."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=1000, img_size=32, patch_size=16).eval()


def test_synset_folders_are_labelled_by_their_imagenet_index(imagenet_head, tmp_path, capsys):
    chosen = [SYNSETS[i] for i in (999, 3, 500)]  # not in folder order, far from 0..2
    dataset = load_dataset(str(_images(tmp_path, chosen, nested=True)), imagenet_head)
    labels = sorted({label for _, label in dataset.samples})
    assert labels == sorted(SYNSETS.index(s) for s in chosen) == [3, 500, 999]
    for path, label in dataset.samples:  # nested one folder deeper: still the class folder's synset
        assert Path(path).parent.parent.name == SYNSETS[label]
    assert len(dataset) == 6 and len(dataset.classes) == 1000
    assert "3 ImageNet synset folders" in capsys.readouterr().err


def test_an_86_synset_subset_is_accepted_and_other_folders_must_match_the_head(imagenet_head, tmp_path):
    subset = _images(tmp_path / "sub", SYNSETS[::11][:86], per_folder=1)
    dataset = load_dataset(str(subset), imagenet_head)
    assert len(dataset) == 86 and [label for _, label in dataset.samples] == list(range(0, 86 * 11, 11))
    named = _images(tmp_path / "named", ["cat", "dog", SYNSETS[0]], per_folder=1)  # not all synsets
    with pytest.raises(UserError, match="3 classes but the model's head has 1000.*synset"):
        load_dataset(str(named), imagenet_head)


def test_the_eval_command_refuses_a_non_synset_folder_in_one_line(tmp_path, capsys):
    named = _images(tmp_path, ["cat", "dog"], per_folder=1)
    code, _, err = run(["eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(_tiny_1000(tmp_path)),
                        "--data", str(named), "--workers", "0", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and one_error_line(err) and "2 classes but the model's head has 1000" in err


def _tiny_1000(tmp_path: Path) -> Path:
    from safetensors.torch import save_file
    torch.manual_seed(0)
    path = tmp_path / "vit_tiny_random.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), str(path))
    return path


def test_without_links_the_walk_is_torchvisions(tmp_path):
    from torchvision import datasets
    root = _images(tmp_path, ["x", "y"], per_folder=2, nested=True)
    _images(tmp_path, ["x", "z"], per_folder=3)
    assert ImageFolder(root).samples == datasets.ImageFolder(str(root)).samples


def test_a_symlink_loop_is_walked_once(tmp_path):
    root = _images(tmp_path, ["a", "b"], per_folder=3)
    os.symlink(root / "a", root / "a" / "loop")  # a/loop -> a
    os.symlink(root / "b", root / "a" / "b_again")  # another class's folder, linked in
    dataset = ImageFolder(root)
    assert len(dataset) == 6 and sorted(p for p, _ in dataset.samples) == sorted(
        str(root / c / f"{i}.png") for c in "ab" for i in range(3))


@needs_imagenet
def test_the_real_vit_tiny_with_ats_equals_the_slow_reference_on_16_sample_images():
    model = load_model("vit_tiny_patch16_224", str(WEIGHTS))
    data = load_dataset(str(SHARED / "sample-1000"), model)
    picks = range(0, 1000, 1000 // 16)
    x = torch.stack([data[i][0] for i in picks]).double()
    labels = [data[i][1] for i in picks]
    assert labels == [SYNSETS.index(Path(data.samples[i][0]).parent.name) for i in picks]
    dense = model.double()
    import copy
    patched = ats_vit.apply(copy.deepcopy(dense))
    with torch.no_grad():
        logits = patched(x)
        stats = ats_vit.last_stats(patched)
        assert len(set(stats.num_kept[:, -1].tolist())) > 4  # real images keep their own counts
        for b in range(len(x)):
            want, kept = reference_forward(dense, x[b:b + 1], range(3, 12), None)
            assert torch.allclose(logits[b], want, atol=1e-8, rtol=0)
            assert all(stats.kept_positions(b, i) == kept[i] for i in range(3, 12))
        # and the real model is a real classifier: most of these 16 right, dense and with ATS
        assert sum(int(dense(x[b:b + 1]).argmax()) == labels[b] for b in range(len(x))) >= 11
        assert sum(int(logits[b].argmax()) == labels[b] for b in range(len(x))) >= 10
