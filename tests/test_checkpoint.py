"""Checkpoints as one unit: a kill at every point where a run changes its folder, then --resume,
gives bit for bit the uninterrupted run; damaged run folders get one error line."""
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ats_vit.jobs.errors import UserError
from ats_vit.jobs.finetune import FinetuneOptions, run_finetune
from conftest import one_error_line, run

TINY = FinetuneOptions(num_tokens=0.5, epochs=2, batch_size=32, limit=64, workers=0, lr=1e-3)

# Audit events of every call that changes a folder (os.replace raises "os.rename").
_CHANGES = {"open", "os.rename", "os.link", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}
_recorder = None  # while set: called with each audited change under the run folder


def _audit(event, args):
    if _recorder is not None and event in _CHANGES:
        if event == "open" and not (isinstance(args[1], str) and set(args[1]) & set("wax+")) \
                and not (args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR)):
            return  # a read
        _recorder([a for a in args if isinstance(a, (str, bytes, os.PathLike))])


sys.addaudithook(_audit)  # hooks cannot be removed; this one does nothing while _recorder is None


def _tree(folder: Path):
    """Every file under ``folder`` with its contents' digest."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_with_snapshots(options, snapshots: Path):
    """Run ``options`` and copy its folder just before each change to it: each copy is what a
    kill at that instant leaves (a kill during a write adds a partial file that the next copy
    shows complete; files are only ever written where nothing reads them before the commit)."""
    global _recorder
    out, copies, seen, busy = Path(options.out), [], set(), [False]

    def record(paths):
        if busy[0] or not any(str(os.fsdecode(p)).startswith(str(out)) for p in paths):
            return
        busy[0] = True
        try:
            state = json.dumps(_tree(out), sort_keys=True) if out.exists() else "none"
            if state not in seen:
                seen.add(state)
                target = snapshots / f"{len(copies):03d}"
                if out.exists():
                    shutil.copytree(out, target, copy_function=shutil.copyfile)
                copies.append(target)
        finally:
            busy[0] = False

    _recorder = record
    try:
        run_finetune(options)
    finally:
        _recorder = None
    return copies


def _result(out: Path):
    rows = [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
            for line in (out / "log.jsonl").read_text().splitlines()]
    return rows, load_file(str(out / "last.safetensors"))


@pytest.mark.slow  # over 10 s on the 2-core CPU
def test_a_kill_at_every_write_boundary_resumes_bit_for_bit(tmp_path, capsys):
    full = tmp_path / "full"
    copies = _run_with_snapshots(replace(TINY, out=str(full)), tmp_path / "snapshots")
    rows, weights = _result(full)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert len(copies) >= 10  # claim, two commits with their publication, the final metadata
    committed = 0
    for copy in copies:
        out = tmp_path / "resumed" / copy.name
        if copy.exists():
            shutil.copytree(copy, out)
        committed += (out / "checkpoint.json").exists()
        if not (out / "run.json").exists():  # killed before the run was recorded: a plain rerun
            run_finetune(replace(TINY, out=str(out)))
        else:
            run_finetune(replace(TINY, out=str(out), resume=True))
        got_rows, got_weights = _result(out)
        assert got_rows == rows, copy.name
        assert got_weights.keys() == weights.keys() and all(torch.equal(weights[k], got_weights[k]) for k in weights)
        assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-0002"]
        assert json.loads((out / "last.json").read_text())["epochs"] == 2
    assert committed >= 4  # kills after the first commit were tried, not only fresh starts
    capsys.readouterr()


def test_a_run_that_saved_nothing_can_be_restarted_in_its_folder(tmp_path, monkeypatch):
    import ats_vit.jobs.finetune as job

    out = tmp_path / "run"

    def dies_in_epoch_one(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies before its first checkpoint

    real_fit = job.fit
    monkeypatch.setattr(job, "fit", dies_in_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(replace(TINY, out=str(out)))
    assert (out / "run.json").exists() and not (out / "checkpoint.json").exists()
    monkeypatch.setattr(job, "fit", real_fit)
    assert [r["epoch"] for r in run_finetune(replace(TINY, out=str(out), epochs=1))] == [1]  # another run, same folder
    with pytest.raises(UserError, match="already holds a run"):
        run_finetune(replace(TINY, out=str(out), epochs=1))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    run_finetune(replace(TINY, out=str(out), epochs=1))
    return out


@pytest.mark.parametrize("damage,match", [
    (lambda out: (out / "run.json").write_text("{not json"), "run.json is unreadable"),
    (lambda out: (out / "run.json").write_text("[1, 2]"), "does not hold a JSON object"),
    (lambda out: (out / "checkpoint.json").write_text('{"epoch": 1}'), "not a checkpoint manifest"),
    (lambda out: _truncate(next(out.glob("epoch-*")) / "state.pt"), "checkpoint in .* is unreadable"),
    (lambda out: _truncate(next(out.glob("epoch-*")) / "model.safetensors"), "checkpoint in .* is unreadable"),
])
def test_a_damaged_run_folder_gets_one_error_line(finished, tmp_path, capsys, damage, match):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "last.json").unlink()  # unfinished, so --resume reads the checkpoint
    damage(out)
    code, _, err = run(["finetune", "--num-tokens", "0.5", "--epochs", "1", "--batch-size", "32", "--limit", "64",
                        "--workers", "0", "--lr", "1e-3", "--out", str(out), "--resume"], capsys)
    assert code == 2 and one_error_line(err), err
    assert re.search(match, err), err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
