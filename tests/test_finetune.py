"""`ats-vit finetune` and `eval` alone and under torchrun (gloo, 2 CPU processes), and resuming."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import ats_vit.jobs.finetune as finetune_job
from ats_vit.jobs.distributed import Dist, shard
from ats_vit.jobs.errors import UserError
from ats_vit.jobs.finetune import FinetuneOptions, run_finetune
from conftest import one_error_line, run

SMALL = FinetuneOptions(num_tokens=0.5, epochs=2, batch_size=64, limit=192, workers=0, lr=1e-3)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _torchrun(args, tmp_path):
    """Run ``python -m ats_vit ARGS`` as 2 gloo processes; returns the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ats_vit", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    run_finetune(replace(SMALL, out=str(out)))
    return out


def test_resume_after_a_kill_continues_exactly(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_fit = finetune_job.fit

    def killed_after_first_epoch(*args, **kwargs):
        def on_epoch(row):
            if row["epoch"] == 1:
                raise KeyboardInterrupt  # the process dies once epoch 1 is saved
        return real_fit(*args, **{**kwargs, "on_epoch": on_epoch})

    monkeypatch.setattr(finetune_job, "fit", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(replace(SMALL, out=str(out)))
    assert [r["epoch"] for r in _log(out)] == [1]
    ran = []
    monkeypatch.setattr(finetune_job, "fit", lambda *a, **k: real_fit(*a, **{**k, "on_epoch": ran.append}))
    resumed = run_finetune(replace(SMALL, out=str(out), resume=True))
    assert [r["epoch"] for r in ran] == [2] and [r["epoch"] for r in resumed] == [1, 2]  # only the missing epoch ran
    full, parts = _log(uninterrupted), _log(out)
    assert [r["step"] for r in parts] == [r["step"] for r in full] == [3, 6]
    for a, b in zip(full, parts):
        assert (a["train_loss"], a["test_top1"], a["test_gmacs"], a["lr"]) == \
               (b["train_loss"], b["test_top1"], b["test_gmacs"], b["lr"])
    expected, got = load_file(str(uninterrupted / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_finetuned_weights_evaluate_with_ats_and_count_gmacs(uninterrupted):
    row = _log(uninterrupted)[-1]
    assert 0 < row["test_top1"] <= 100 and 0 < row["test_gmacs"] < 0.11  # dense is 0.110
    meta = json.loads((uninterrupted / "last.json").read_text())
    assert meta["model"] == "vit_fmnist_patch2_28" and meta["ats"]["num_tokens"] == 0.5


@pytest.mark.parametrize("change,field", [(dict(num_tokens=0.3), "num_tokens"), (dict(lr=1e-4), "lr"),
                                          (dict(model="deit_tiny_patch16_224", checkpoint=None), "model")])
def test_resume_refuses_another_configuration(uninterrupted, change, field):
    with pytest.raises(UserError, match=f"holds another run: .*{field} was"):
        run_finetune(replace(SMALL, out=str(uninterrupted), resume=True, **change))


def test_bad_finetune_input_gets_one_error_line(uninterrupted, tmp_path, capsys):
    base = ["finetune", "--limit", "64", "--batch-size", "32", "--epochs", "1", "--workers", "0"]
    cases = [
        (["--out", str(uninterrupted)], "already holds a run"),
        (["--out", str(tmp_path / "none"), "--resume"], "holds no run"),
        (["--out", str(tmp_path / "a"), "--amp", "float16"], "--amp float16 needs a CUDA device"),
        (["--out", str(tmp_path / "b"), "--amp", "fp8"], "--amp must be one of"),
        (["--out", str(tmp_path / "c"), "--blocks", "3-40"], "blocks contains 12"),
        (["--out", str(tmp_path / "d"), "--data", str(tmp_path)], "train/ and val/"),
    ]
    for args, match in cases:
        code, _, err = run(base + args, capsys)
        assert code == 2 and match in err and one_error_line(err), (args, err)


def test_more_processes_than_images_is_refused():
    with pytest.raises(UserError, match="3 processes for 2 images"):
        shard(list(range(2)), Dist(rank=0, world=3))
    blocks = [list(shard(list(range(7)), Dist(rank=r, world=3))) for r in range(3)]
    assert sum(blocks, []) == list(range(7))  # contiguous, each image once, in rank order


@pytest.mark.slow  # over 10 s on the 2-core CPU
def test_two_process_eval_equals_one_process(tmp_path):
    args = ["eval", "--limit", "64", "--batch-size", "16", "--num-tokens", "0.5", "--workers", "0",
            "--calib-images", "16", "--timing-repeats", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    alone = subprocess.run([sys.executable, "-m", "ats_vit", *args, "--out", str(tmp_path / "one")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert alone.returncode == 0, alone.stderr
    two = _torchrun([*args, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr
    one, both = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert both["meta"]["processes"] == 2 and both["meta"]["images"] == 64
    keys = ("method", "top1", "top5", "gmacs", "tokens_per_ats_block")
    assert [{k: r[k] for k in keys} for r in one["rows"]] == [{k: r[k] for k in keys} for r in both["rows"]]


@pytest.mark.slow  # over 10 s on the 2-core CPU
def test_two_process_finetune_lowers_the_loss(tmp_path):
    out = tmp_path / "ddp"
    done = _torchrun(["finetune", "--num-tokens", "0.3", "--limit", "512", "--batch-size", "64", "--epochs", "3",
                      "--lr", "1e-3", "--workers", "0", "--out", str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    log = _log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]  # one writer: rank 0
    assert [r["step"] for r in log] == [8, 16, 24]  # 512 images, global batch 64 split over 2 processes
    assert log[-1]["train_loss"] < log[0]["train_loss"]


def test_train_command_logs_checkpoints_and_refuses_to_resume_a_finished_run(tmp_path, capsys):
    out = tmp_path / "scratch"
    args = ["train", "--limit", "256", "--epochs", "1", "--batch-size", "128", "--out", str(out)]
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert [r["step"] for r in _log(out)] == [2] and (out / "vit_fmnist_patch2_28.safetensors").is_file()
    meta = json.loads((out / "vit_fmnist_patch2_28.json").read_text())
    assert meta["train_seconds"] == round(sum(r["epoch_seconds"] for r in _log(out)), 1)
    code, _, err = run(args + ["--resume"], capsys)
    assert code == 2 and "already finished its 1 epochs" in err and one_error_line(err)
