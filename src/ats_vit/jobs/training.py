"""Training loop (from scratch or fine-tuning, ATS in place or not): timm's AdamW and cosine
schedule, autocast, DistributedDataParallel under torchrun, per-epoch logs and resumable
checkpoints."""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .checkpoint import Checkpoint, publish, save_checkpoint
from .distributed import Dist, barrier, shard
from .errors import UserError
from .evaluation import predict
from .options import Option, at_least, one_of

AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Options of the commands that train (``train``, ``finetune``).
EPOCHS = Option("--epochs", int, check=at_least(1))
LR = Option("--lr", float, "peak learning rate", check=lambda v: None if v > 0 else "must be > 0")
WARMUP_EPOCHS = Option("--warmup-epochs", float, check=at_least(0))
AMP = Option("--amp", help="none, bfloat16 or float16 (CUDA) autocast", check=one_of(lambda: list(AMP_DTYPES)))


@dataclass
class TrainConfig:
    epochs: int = 9
    batch_size: int = 128  # global: split evenly over the processes
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    amp: str = "none"
    workers: int = 0
    seed: int = 0

    def check(self, device: torch.device, d: Dist, train_images: int) -> None:
        """Refuse settings this device, process count or training set cannot run."""
        if self.amp not in AMP_DTYPES:
            raise UserError(f"--amp must be one of {list(AMP_DTYPES)}, got {self.amp!r}")
        if self.amp == "float16" and device.type != "cuda":
            raise UserError("--amp float16 needs a CUDA device (its gradient scaler is CUDA only); "
                            "use bfloat16 on the CPU")
        if self.epochs < 1 or self.lr <= 0:
            raise UserError(f"--epochs must be >= 1 and --lr > 0, got {self.epochs} and {self.lr}")
        if self.batch_size < 1 or self.batch_size % d.world:
            raise UserError(f"--batch-size {self.batch_size} must be a positive multiple of the {d.world} processes")
        if train_images < self.batch_size:
            raise UserError(f"{train_images} training images do not fill one batch of {self.batch_size}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def scaled_param_groups(model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float]) -> List[Dict]:
    """timm's weight-decay parameter groups (none on 1-D parameters and the model's
    ``no_weight_decay`` names), each split by ``lr_scale`` of the parameter's name (timm's
    schedulers honour a group's ``lr_scale``)."""
    names = {p: n for n, p in model.named_parameters()}
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = []
    for group in param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip):
        by_scale: Dict[float, list] = {}
        for p in group["params"]:
            by_scale.setdefault(lr_scale(names[p]), []).append(p)
        groups += [{**group, "params": params, "lr_scale": scale} for scale, params in by_scale.items()]
    return groups


def fit(model: nn.Module, train_set: Dataset, test_set: Dataset, classes: int, config: TrainConfig,
        out_dir: Path, device: torch.device, d: Dist = Dist(), saved: Optional[Checkpoint] = None,
        on_epoch: Callable[[Dict], None] = lambda row: None, objective: Optional[Objective] = None,
        lr_scale: Optional[Callable[[str], float]] = None) -> List[Dict]:
    """Train ``model`` as it is (ATS applied or not) and evaluate it after each epoch; returns
    the log rows of every epoch of the run.

    Each epoch's row (train loss, test top-1, mean GMACs per test image, learning rate, seconds)
    goes to ``on_epoch`` and, with the weights and the optimizer, scheduler and scaler state, into
    one checkpoint in ``out_dir`` (see ``checkpoint``). From a ``saved`` checkpoint the run
    continues after its epoch and computes what the uninterrupted run would have: every epoch's
    data order and random state derive from (seed, epoch, rank) alone. Rank 0 writes.

    ``objective(net, images, labels)`` is the training loss (default: label-smoothed
    cross-entropy of ``net(images)``; ``net`` is the model or its DistributedDataParallel
    wrapper); ``lr_scale`` scales the learning rate per parameter name (default: 1 for all).
    """
    config.check(device, d, len(train_set))
    steps_per_epoch = len(train_set) // config.batch_size
    model.to(device)
    if saved is not None:  # before DistributedDataParallel copies rank 0's weights to the others
        model.load_state_dict({k: v.to(device) for k, v in saved.weights.items()})
    sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    train_loader = DataLoader(train_set, batch_size=config.batch_size // d.world, sampler=sampler, drop_last=True,
                              num_workers=config.workers)
    test_loader = DataLoader(shard(test_set, d), batch_size=256, num_workers=config.workers)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if d.world > 1 else model
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay,
                                    param_group_fn=None if lr_scale is None else
                                    lambda m: scaled_param_groups(m, config.weight_decay, lr_scale))
    scheduler = CosineLRScheduler(optimizer, t_initial=config.epochs * steps_per_epoch, lr_min=config.min_lr,
                                  warmup_t=int(config.warmup_epochs * steps_per_epoch), warmup_lr_init=1e-6,
                                  t_in_epochs=False)
    amp = AMP_DTYPES[config.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if objective is None:
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

        def objective(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return criterion(net(images), labels)
    start_epoch, step, rows = 0, 0, []
    if saved is not None:
        optimizer.load_state_dict(saved.state["optimizer"])
        scheduler.load_state_dict(saved.state["scheduler"])
        scaler.load_state_dict(saved.state["scaler"])
        start_epoch, step, rows = saved.epoch, saved.state["step"], list(saved.rows)
        scheduler.step_update(step)
        if d.main:  # repairs what a kill between commit and publication left stale
            publish(out_dir, saved)
    for epoch in range(start_epoch, config.epochs):
        seed_everything(config.seed + 1000 * epoch + d.rank)
        sampler.set_epoch(epoch)
        net.train()
        start = time.time()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, batches
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not d.main)
        for images, labels in bar:
            with torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext():
                loss = objective(net, images.to(device), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            scheduler.step_update(step)
            loss_sum += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if d.world > 1:
            torch.distributed.all_reduce(loss_sum)
        train_time = time.time() - start
        result = predict(model, test_loader, device, classes, d)
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(loss_sum[0] / loss_sum[1]),
               "test_top1": result.top1, "test_gmacs": result.mean_gmacs, "lr": optimizer.param_groups[0]["lr"],
               "epoch_seconds": round(train_time, 1)}
        rows.append(row)
        if d.main:
            save_checkpoint(out_dir, Checkpoint(epoch + 1, model.state_dict(), {
                "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "config": asdict(config)}, rows))
        barrier(d)
        on_epoch(row)
    return rows
