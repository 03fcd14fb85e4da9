import json

import pytest

from ats_vit.jobs.evaluation import match_gmacs
from conftest import one_error_line, run


def test_eval_on_image_folder_with_local_checkpoint(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, _ = run(["eval", "--model", "vit_fmnist_patch2_28", "--checkpoint", str(tiny_checkpoint),
                           "--data", str(image_folder), "--blocks", "3-11", "--num-tokens", "0.5",
                           "--workers", "0", "--timing-repeats", "1", "--out", str(out)], capsys)
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows][0] == "dense" and len(rows) == 2
    assert result["meta"]["images"] == 9
    dense, ats = rows
    assert ats["gmacs"] < dense["gmacs"] and ats["reduction_pct"] > 0
    assert len(ats["tokens_per_ats_block"]) == 9 and ats["tokens_per_ats_block"][0] <= 98
    assert dense["top5"] is None  # 3 classes: top-5 is meaningless
    assert set(ats["speed"]) == {"256"} and ats["speed"]["256"]["images_per_s"] > 0  # --batch-size by default
    with open(out / "results.csv") as f:  # the speed figures as flat columns, one per batch size
        assert {"speedup_b256", "images_per_s_b256", "median_ms_b256", "p90_ms_b256"} <= set(f.readline().strip().split(","))
    for name in ["results.csv", "accuracy_vs_gmacs.png", "tokens_per_block.png"]:
        assert (out / name).stat().st_size > 0
    assert "dense" in stdout and "ATS blocks" in stdout


def test_weights_file_with_metadata_as_model(tiny_checkpoint, image_folder, tmp_path, capsys):
    code, _, err = run(["eval", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--limit", "4",
                        "--blocks", "3", "--workers", "0", "--timing-repeats", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["images"] == 4


def test_target_gmacs_lands_on_target(tiny_checkpoint, image_folder, tmp_path, capsys):
    code, _, err = run(["eval", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--target-gmacs", "0.06",
                        "--calib-images", "9", "--workers", "0", "--timing-repeats", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    ats = json.loads((tmp_path / "results.json").read_text())["rows"][1]
    assert abs(ats["gmacs"] - 0.06) / 0.06 < 0.02


def test_full_suite_rows(tiny_checkpoint, image_folder, tmp_path, capsys):
    code, _, err = run(["eval", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--calib-images", "9",
                        "--reductions", "0.4,0.6", "--workers", "0", "--timing-repeats", "1", "--out", str(tmp_path)],
                       capsys)
    assert code == 0, err
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert len(rows) == 1 + 3 + 3 + 2
    for r in (0.4, 0.6):
        ats = rows[f"ATS 3-11 -{r:.0%}"]
        assert abs(ats["reduction_pct"] - 100 * r) < 2
        for rival in (f"top-K 3-11 = ATS 3-11 -{r:.0%}", f"ATS 3 only = ATS 3-11 -{r:.0%}"):
            assert abs(rows[rival]["gmacs"] - ats["gmacs"]) / ats["gmacs"] < 0.02
            assert rows[rival]["blocks"] == ([3] if "only" in rival else list(range(3, 12)))
            assert rows[rival]["vs"] == ats["method"]  # compared with the ATS row it was matched to
        assert ats["vs"] == "dense"


def test_match_gmacs_bisects_a_monotone_knob():
    knob, value = match_gmacs(lambda f: 10 * f ** 2 + 1, target=4.0, tolerance=1e-4)
    assert abs(value - 4.0) <= 4e-4 and abs(knob - (0.3 ** 0.5)) < 1e-3


@pytest.mark.parametrize("args,match", [
    (["--data", "/nonexistent/folder"], "neither 'fashion-mnist' nor a folder"),
    (["--model", "no_such_model_xyz"], "unknown timm model"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--target-gmacs", "5.0"], "outside what this configuration can reach"),
    (["--target-gmacs", "0.0001"], "outside what this configuration can reach"),
    (["--sampler", "nope"], "sampler must be one of"),
])
def test_bad_input_one_line_error(args, match, tiny_checkpoint, image_folder, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--workers", "0",
            "--calib-images", "3", "--out", str(tmp_path)]
    code, _, err = run(base + args, capsys)
    assert code == 2
    assert match in err and one_error_line(err)


def test_empty_folder_and_checkpoint_that_does_not_fit(tiny_checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["eval", "--model", str(tiny_checkpoint), "--data", str(empty), "--out", str(tmp_path)], capsys)
    assert code == 2 and "--data" in err and one_error_line(err)
    code, _, err = run(["eval", "--model", "deit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint),
                        "--data", str(empty), "--out", str(tmp_path)], capsys)
    assert code == 2 and "does not fit deit_tiny_patch16_224" in err and one_error_line(err)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_named(tiny_checkpoint, image_folder, tmp_path, capsys, workers):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "coat" / "broken.png").write_bytes(b"not a png at all")
    code, _, err = run(["eval", "--model", str(tiny_checkpoint), "--data", str(data), "--blocks", "3",
                        "--workers", workers, "--calib-images", "2", "--out", str(tmp_path)], capsys)
    assert code == 2 and "broken.png" in err and one_error_line(err)


def test_imagenet_style_model_and_folder(image_folder, tmp_path, capsys):
    """`--model deit_... --checkpoint FILE --data FOLDER`: RGB, resize and crop to 224 by timm's transforms."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "deit_tiny.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224", num_classes=3).state_dict(), str(weights))  # 3 folders
    code, _, err = run(["eval", "--model", "deit_tiny_patch16_224", "--checkpoint", str(weights),
                        "--data", str(image_folder), "--limit", "4", "--num-tokens", "100", "--workers", "0",
                        "--timing-repeats", "1", "--out", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    dense, ats = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
    assert dense["gmacs"] == pytest.approx(1.258, abs=5e-3)  # DeiT-Ti at 224: 196 patch tokens
    assert ats["tokens_per_ats_block"][0] <= 100 and ats["gmacs"] < dense["gmacs"]
