"""The ``ats-vit finetune`` job: train a model with ATS in place, alone or under torchrun."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .distributed import setup
from .errors import UserError
from .loading import load_dataset, load_model, load_train_dataset, num_classes
from .patch import apply
from .train import TrainConfig, check_run_folder, claim_run_folder, fit


@dataclass
class FinetuneOptions:
    model: Optional[str] = None
    checkpoint: Optional[str] = None
    data: str = "fashion-mnist"
    blocks: Optional[Sequence[int]] = None
    num_tokens: object = None
    sampler: str = "inverse_transform"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-4
    warmup_epochs: float = 0.2
    amp: str = "none"
    limit: Optional[int] = None
    workers: int = 2
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/finetune"
    resume: bool = False
    command: str = ""

    def identity(self) -> Dict:
        """What a resumed run must share with the run it continues."""
        skip = ("workers", "device", "out", "resume", "command")
        return {k: v for k, v in asdict(self).items() if k not in skip}


def run_finetune(options: FinetuneOptions) -> List[Dict]:
    """Fine-tune with ATS applied; returns the per-epoch log rows."""
    if options.workers < 0:
        raise UserError(f"--workers must be >= 0, got {options.workers}")
    out = Path(options.out)
    check_run_folder(out, options.identity(), options.resume)
    with setup(options.device) as (d, device):
        model = load_model(options.model, options.checkpoint, "finetune")
        try:
            apply(model, blocks=options.blocks, num_tokens=options.num_tokens, sampler=options.sampler)
        except (ValueError, TypeError) as e:
            raise UserError(f"{e} (from --blocks/--num-tokens/--sampler)") from None
        data = options.data
        train_set = load_train_dataset(data, model, options.limit)
        test_set = load_dataset(data if data == "fashion-mnist" else str(Path(data) / "val"), model, options.limit)
        if num_classes(train_set) != model.num_classes:
            raise UserError(f"--data has {num_classes(train_set)} classes but the model's head has "
                            f"{model.num_classes}; pass a checkpoint trained on these classes")
        config = TrainConfig(epochs=options.epochs, batch_size=options.batch_size, lr=options.lr, min_lr=options.lr / 100,
                             warmup_epochs=options.warmup_epochs, amp=options.amp, workers=options.workers,
                             seed=options.seed)
        config.check(device, d, len(train_set))
        if not options.resume:
            claim_run_folder(out, options.identity(), d)
        say = (lambda row: print(json.dumps(row), flush=True)) if d.main else (lambda row: None)
        history = fit(model, train_set, test_set, num_classes(test_set), config, out, device, d,
                      resume=options.resume, on_epoch=say)
        if d.main:
            meta = {"model": model.pretrained_cfg["architecture"],
                    "ats": {"blocks": options.blocks, "num_tokens": options.num_tokens, "sampler": options.sampler},
                    "epochs": options.epochs, "command": options.command, "processes": d.world,
                    "torch": torch.__version__}
            (out / "last.json").write_text(json.dumps(meta, indent=2) + "\n")
            print(f"wrote {out}/last.safetensors (+ last.json naming its timm model for `ats-vit eval --model`)")
    return history
