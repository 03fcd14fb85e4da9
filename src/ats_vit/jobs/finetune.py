"""The ``ats-vit finetune`` command: train a model with ATS in place, alone or under torchrun."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .distributed import setup
from .evaluation import Method, apply_method
from .loading import load_dataset, load_model, load_train_dataset, num_classes
from .options import (BATCH_SIZE, BLOCKS, CHECKPOINT, DATA, DEFAULT_DEVICE, DEVICE, LIMIT, MODEL, NUM_TOKENS, OUT,
                      RESUME, SAMPLER, SEED, WORKERS, check_options)
from .report import machine, write_json
from .checkpoint import check_run_folder, claim_run_folder
from .training import AMP, EPOCHS, LR, WARMUP_EPOCHS, TrainConfig, fit


@dataclass
class FinetuneOptions:
    model: Optional[str] = MODEL()
    checkpoint: Optional[str] = CHECKPOINT()
    data: str = DATA("fashion-mnist", help="'fashion-mnist' or a folder with train/ and val/ sub-folders of "
                                           "class folders")
    blocks: Optional[Sequence[int]] = BLOCKS()
    num_tokens: object = NUM_TOKENS()
    sampler: str = SAMPLER("inverse_transform")
    epochs: int = EPOCHS(3)
    batch_size: int = BATCH_SIZE(128, help="global batch, split over the processes")
    lr: float = LR(3e-4)
    warmup_epochs: float = WARMUP_EPOCHS(0.2)
    amp: str = AMP("none")
    limit: Optional[int] = LIMIT()
    workers: int = WORKERS(2)
    seed: int = SEED(0)
    device: str = DEVICE(DEFAULT_DEVICE)
    out: str = OUT("runs/finetune")
    resume: bool = RESUME(False)
    command: str = ""

    def identity(self) -> Dict:
        """What a resumed run must share with the run it continues."""
        skip = ("workers", "device", "out", "resume", "command")
        return {k: v for k, v in asdict(self).items() if k not in skip}


def run_finetune(options: FinetuneOptions) -> List[Dict]:
    """Fine-tune with ATS applied; returns the per-epoch log rows."""
    check_options(options)
    out = Path(options.out)
    saved = check_run_folder(out, options.identity(), options.resume, done=out / "last.json")
    with setup(options.device) as (d, device):
        model = load_model(options.model, options.checkpoint, "finetune")
        apply_method(model, Method("finetune", "ATS", options.blocks, options.num_tokens, options.sampler))
        data = options.data
        train_set = load_train_dataset(data, model, options.limit)
        test_set = load_dataset(data if data == "fashion-mnist" else str(Path(data) / "val"), model, options.limit)
        config = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, min_lr=options.lr / 100,
                             warmup_epochs=options.warmup_epochs, amp=options.amp, workers=options.workers,
                             seed=options.seed)
        config.check(device, d, len(train_set))
        if saved is None:
            claim_run_folder(out, options.identity(), d)
        say = (lambda row: print(json.dumps(row), flush=True)) if d.main else (lambda row: None)
        history = fit(model, train_set, test_set, num_classes(test_set), config, out, device, d,
                      saved=saved, on_epoch=say)
        if d.main:
            meta = {"model": model.pretrained_cfg["architecture"],
                    "ats": {"blocks": options.blocks, "num_tokens": options.num_tokens, "sampler": options.sampler},
                    "epochs": options.epochs, "command": options.command, "processes": d.world,
                    **machine(options.device)}
            write_json(out / "last.json", meta)  # last: it marks the run as finished
            print(f"wrote {out}/last.safetensors (+ last.json naming its timm model for `ats-vit eval --model`)")
    return history


COMMAND = dict(
    name="finetune", options=FinetuneOptions, run=run_finetune,
    help="fine-tune a model with ATS in place (alone or under torchrun)",
    description="Trains with ATS applied (selection deterministic, gradients through the kept tokens); evaluates "
                "top-1 and mean GMACs after each epoch; checkpoints every epoch. Runs unchanged under torchrun "
                "--nproc_per_node N.")
