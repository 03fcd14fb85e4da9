"""The ``ats-vit train`` command: train a bundled Fashion-MNIST ViT from scratch (seeded,
logged, checkpointed, resumable)."""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from torch.utils.data import Subset

from ..zoo import BUNDLED, FMNIST_MODEL
from .checkpoint import WEIGHTS, check_run_folder, claim_run_folder
from .data import fashion_mnist
from .distributed import Dist
from .options import BATCH_SIZE, LIMIT, OUT, RESUME, SEED, Option, check_options, one_of, writable_folder
from .report import machine, save_atomic, write_json
from .training import EPOCHS, LR, TrainConfig, fit

DATA_ROOT = Option("--data-root", help="where Fashion-MNIST is staged (default ~/.cache/ats-vit/data)",
                   check=writable_folder)
ARCH = Option("--model", help="which bundled architecture to train: " + ", ".join(BUNDLED),
              check=one_of(lambda: tuple(BUNDLED)))


@dataclass
class TrainOptions:
    model: str = ARCH(FMNIST_MODEL)
    epochs: int = EPOCHS(9)
    batch_size: int = BATCH_SIZE(128)
    lr: float = LR(1.5e-3)
    seed: int = SEED(0)
    out: str = OUT("runs/fmnist")
    data_root: Optional[str] = DATA_ROOT()
    limit: Optional[int] = LIMIT(help="train and test on the first N images only")
    resume: bool = RESUME(False)
    command: str = ""


def run_train(options: TrainOptions) -> dict:
    """Train, save the weights with their metadata beside them, and return the metadata."""
    check_options(options)
    out = Path(options.out)
    config = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, seed=options.seed)
    identity = {"job": "train", "model": options.model, "limit": options.limit or 0, **vars(config)}
    weights, meta_path = out / f"{options.model}.safetensors", out / f"{options.model}.json"
    saved = check_run_folder(out, identity, options.resume, done=meta_path)
    train_set, test_set = fashion_mnist(True, options.data_root), fashion_mnist(False, options.data_root)
    if options.limit:
        train_set = Subset(train_set, range(options.limit))
        test_set = Subset(test_set, range(min(options.limit, len(test_set))))
    torch.manual_seed(options.seed)
    model = timm.create_model(options.model, pretrained=False)
    config.check(torch.device("cpu"), Dist(), len(train_set))
    if saved is None:
        claim_run_folder(out, identity, Dist())
    start = time.time()
    history = fit(model, train_set, test_set, 10, config, out, torch.device("cpu"), saved=saved,
                  on_epoch=lambda row: print(json.dumps(row), flush=True))
    save_atomic(lambda tmp: shutil.copyfile(out / WEIGHTS, tmp), weights)
    meta = {
        "model": options.model, "command": options.command, "seed": options.seed,
        "epochs": options.epochs, "train_images": len(train_set), "test_images": len(test_set),
        # this process's time, and every epoch's training time (resumed runs' epochs included)
        "wall_seconds": round(time.time() - start, 1), "train_seconds": round(sum(r["epoch_seconds"] for r in history), 1),
        "test_top1": history[-1]["test_top1"],
        "config": vars(config), **machine("cpu"), "timm": timm.__version__,
    }
    write_json(meta_path, meta)  # last: it marks the run as finished
    print(f"wrote {weights} (test top-1 {meta['test_top1']:.2f}%)")
    return meta


COMMAND = dict(name="train", options=TrainOptions, run=run_train,
               help="train a bundled Fashion-MNIST ViT (seeded, logged, checkpointed)")
