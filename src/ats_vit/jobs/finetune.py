"""The ``ats-vit finetune`` command: train a model with ATS (or DynamicViT) in place, alone or
under torchrun."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..core.budget import check_num_tokens
from ..hosts import default_blocks, training_outputs
from ..reducers.dynamicvit import PREDICTORS, dynamicvit_loss, keep_targets
from .distributed import setup
from .evaluation import Method, apply_method
from .loading import load_dataset, load_model, load_train_dataset, num_classes
from .options import (BATCH_SIZE, BLOCKS, CHECKPOINT, DATA, DEFAULT_DEVICE, DEVICE, LIMIT, MODEL, NUM_TOKENS, OUT,
                      REDUCER, RESUME, SAMPLER, SEED, WORKERS, check_options)
from .report import machine, write_json
from .checkpoint import check_run_folder, claim_run_folder
from .training import AMP, EPOCHS, LR, WARMUP_EPOCHS, Objective, TrainConfig, fit

# DynamicViT trains the backbone at a far lower learning rate than its predictors (the paper's split).
BACKBONE_LR_SCALE = 0.01


@dataclass
class FinetuneOptions:
    model: Optional[str] = MODEL()
    checkpoint: Optional[str] = CHECKPOINT()
    data: str = DATA("fashion-mnist", help="'fashion-mnist' or a folder with train/ and val/ sub-folders of "
                                           "class folders")
    blocks: Optional[Sequence[int]] = BLOCKS()
    num_tokens: object = NUM_TOKENS()
    sampler: str = SAMPLER("inverse_transform")
    reducer: str = REDUCER("ats")
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
        teacher = _frozen(model) if options.reducer == "dynamicvit" else None
        method = Method("finetune", options.reducer, _blocks(model, options), options.num_tokens, options.sampler,
                        reducer=options.reducer)
        apply_method(model, method)
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
        objective, lr_scale = None, None
        if teacher is not None:
            budgets = check_num_tokens(method.num_tokens, len(method.blocks))  # one per pruning block
            objective = _dynamicvit_objective(model, teacher.to(device), budgets, config.label_smoothing)
            lr_scale = _predictors_first
        history = fit(model, train_set, test_set, num_classes(test_set), config, out, device, d,
                      saved=saved, on_epoch=say, objective=objective, lr_scale=lr_scale)
        if d.main:
            meta = {"model": model.pretrained_cfg["architecture"],
                    "ats": {"blocks": options.blocks, "num_tokens": options.num_tokens, "sampler": options.sampler,
                            "reducer": options.reducer},
                    "epochs": options.epochs, "command": options.command, "processes": d.world,
                    **machine(options.device)}
            write_json(out / "last.json", meta)  # last: it marks the run as finished
            print(f"wrote {out}/last.safetensors (+ last.json naming its timm model for `ats-vit eval --model`)")
    return history


def _blocks(model: nn.Module, options: FinetuneOptions) -> Sequence[int]:
    return tuple(options.blocks) if options.blocks is not None else default_blocks(model, options.reducer)


def _predictors_first(name: str) -> float:
    """DynamicViT's learning-rate scale of a parameter: 1 for its predictors, far less for the backbone."""
    return 1.0 if name.startswith(PREDICTORS + ".") else BACKBONE_LR_SCALE


def _frozen(model: nn.Module) -> nn.Module:
    """The dense model as it is now, as a fixed teacher."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def _dynamicvit_objective(model: nn.Module, teacher: nn.Module, budgets: Sequence, label_smoothing: float) -> Objective:
    """DynamicViT's loss (:func:`~ats_vit.reducers.dynamicvit.dynamicvit_loss`) of a training
    forward with the pruning blocks' ``budgets``, against the dense ``teacher``'s logits and final
    tokens."""
    P = model.num_prefix_tokens

    def objective(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = net(images)
        keep_masks, features = training_outputs(model)
        with torch.no_grad():
            teacher_features = teacher.forward_features(images)
            teacher_logits = teacher.forward_head(teacher_features)
        targets = keep_targets(budgets, features.shape[1] - P)
        return dynamicvit_loss(logits, labels, teacher_logits, features, teacher_features, keep_masks, targets, P,
                               label_smoothing)[0]
    return objective


COMMAND = dict(
    name="finetune", options=FinetuneOptions, run=run_finetune,
    help="fine-tune a model with ATS (or DynamicViT, --reducer dynamicvit) in place (alone or under torchrun)",
    description="Trains with ATS applied (selection deterministic, gradients through the kept tokens); evaluates "
                "top-1 and mean GMACs after each epoch; checkpoints every epoch. Runs unchanged under torchrun "
                "--nproc_per_node N. With --reducer dynamicvit: DynamicViT's predictors (blocks 3,6,9 of 12 by "
                "default, keeping --num-tokens of the tokens entering each) train at --lr and the backbone at "
                f"{BACKBONE_LR_SCALE:g} x --lr, on DynamicViT's loss against the dense model as the teacher.")
