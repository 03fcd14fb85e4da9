"""Run folders and their checkpoints.

One epoch's checkpoint is one unit: a folder ``epoch-NNNN`` holding the weights, the optimizer
state and the log rows so far, committed by rewriting the manifest ``checkpoint.json`` (atomically)
to name it. A kill before that leaves the previous checkpoint in force and an uncommitted folder
that is ignored; a kill after it leaves the new one. What users read (``last.safetensors``,
``log.csv``, ``log.jsonl``) is published from the committed checkpoint after each commit and again
on resume, so it is repaired if a kill came between.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from safetensors.torch import load_file, save_file

from .distributed import Dist, barrier
from .errors import UserError
from .report import save_atomic, write_json

RUN, MANIFEST = "run.json", "checkpoint.json"
WEIGHTS, LOG, LOG_JSONL = "last.safetensors", "log.csv", "log.jsonl"
_MODEL, _STATE, _ROWS = "model.safetensors", "state.pt", "log.jsonl"  # inside an epoch folder
_FOLDER_PREFIX = "epoch-"


@dataclass
class Checkpoint:
    """A committed epoch: model weights, training state (optimizer, scheduler, scaler, step) and
    the log rows of every epoch so far."""
    epoch: int
    weights: Dict[str, torch.Tensor]
    state: Dict
    rows: List[Dict]


def _folder(out_dir: Path, epoch: int) -> Path:
    return out_dir / f"{_FOLDER_PREFIX}{epoch:04d}"


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` as one unit, commit it, then publish it."""
    folder = _folder(out_dir, checkpoint.epoch)
    if folder.exists():  # left uncommitted by a killed run
        shutil.rmtree(folder)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in checkpoint.weights.items()}, str(folder / _MODEL))
    torch.save(checkpoint.state, folder / _STATE)
    (folder / _ROWS).write_text(_jsonl(checkpoint.rows))
    write_json(out_dir / MANIFEST, {"epoch": checkpoint.epoch, "folder": folder.name})  # the commit
    publish(out_dir, checkpoint)


def _jsonl(rows: List[Dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def publish(out_dir: Path, checkpoint: Checkpoint) -> None:
    """Make ``last.safetensors`` and the logs those of the committed ``checkpoint`` and remove
    every other epoch folder."""
    folder = _folder(out_dir, checkpoint.epoch)
    save_atomic(lambda tmp: _link_or_copy(folder / _MODEL, Path(tmp)), out_dir / WEIGHTS)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(checkpoint.rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(checkpoint.rows)
    save_atomic(lambda tmp: Path(tmp).write_text(text.getvalue()), out_dir / LOG)
    save_atomic(lambda tmp: Path(tmp).write_text(_jsonl(checkpoint.rows)), out_dir / LOG_JSONL)
    for stale in out_dir.glob(f"{_FOLDER_PREFIX}*"):
        if stale != folder:
            shutil.rmtree(stale)


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights on disk), or a copy where links are not allowed."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def read_checkpoint(out_dir: Path) -> Optional[Checkpoint]:
    """The committed checkpoint of ``out_dir``; None when its run has committed none."""
    manifest = _read_json(out_dir / MANIFEST)
    if manifest is None:
        return None
    try:
        epoch, folder = int(manifest["epoch"]), out_dir / str(manifest["folder"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"--resume: {out_dir / MANIFEST} is not a checkpoint manifest") from None
    try:
        weights = load_file(str(folder / _MODEL))
        state = torch.load(folder / _STATE, map_location="cpu", weights_only=True)
        rows = [json.loads(line) for line in (folder / _ROWS).read_text().splitlines()]
    except Exception as e:  # missing, truncated or damaged by hand: nothing in this program writes that
        raise UserError(f"--resume: the checkpoint in {folder} is unreadable ({type(e).__name__}); "
                        f"start a new run in another folder") from None
    return Checkpoint(epoch, weights, state, rows)


def _read_json(path: Path) -> Optional[Dict]:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: {path} is unreadable ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"--resume: {path} does not hold a JSON object")
    return data


def check_run_folder(out_dir: Path, identity: Dict, resume: bool, done: Path) -> Optional[Checkpoint]:
    """Check ``out_dir`` against the run about to start and return the checkpoint to resume from.

    ``identity`` is everything a resumed run must share with the run it continues; ``done`` is
    the file a finished run writes last. Without ``resume`` the folder must hold no committed
    checkpoint (a folder whose run saved nothing is reused); with it, it must hold a run with
    the same identity that has not finished. None: start from the first epoch.
    """
    if not resume:
        if (out_dir / MANIFEST).exists():
            raise UserError(f"--out {out_dir} already holds a run; pass --resume to continue it or choose another folder")
        return None
    saved = _read_json(out_dir / RUN)
    if saved is None:
        raise UserError(f"--resume: {out_dir} holds no run ({RUN})")
    identity = json.loads(json.dumps(identity))  # compare as the record stores it (tuples become lists)
    changed = [f"{k} was {saved.get(k)!r}, now {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if changed:
        raise UserError(f"--resume: {out_dir} holds another run: " + "; ".join(changed))
    checkpoint = read_checkpoint(out_dir)
    if checkpoint is not None and done.exists() and checkpoint.epoch >= identity["epochs"]:
        raise UserError(f"--resume: {out_dir} already finished its {identity['epochs']} epochs")
    return checkpoint


def claim_run_folder(out_dir: Path, identity: Dict, d: Dist) -> None:
    """Record a new run in ``out_dir`` (rank 0, once every rank has validated its inputs)."""
    barrier(d)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / RUN, identity)
