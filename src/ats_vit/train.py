"""Supervised training loop with timm's optimizer and scheduler, per-epoch logs and checkpoints."""
from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm


@dataclass
class TrainConfig:
    epochs: int = 9
    batch_size: int = 128
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    seed: int = 0


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a generator for the data loader's shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "eval") -> Dict[str, float]:
    """Top-1 accuracy (percent) of ``model`` on ``loader``."""
    model.eval()
    correct = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False):
        logits = model(images.to(device))
        correct += int((logits.argmax(-1).cpu() == labels).sum())
        total += len(labels)
    return {"top1": 100.0 * correct / max(total, 1), "images": total}


def fit(model: nn.Module, train_set, test_set, config: TrainConfig, out_dir: Path,
        device: Optional[torch.device] = None,
        on_epoch: Callable[[Dict], None] = lambda row: None) -> List[Dict]:
    """Train ``model``; after each epoch evaluate, log (CSV and JSON lines) and save weights.

    Writes ``out_dir/log.csv``, ``out_dir/log.jsonl``, ``out_dir/last.safetensors`` and
    ``out_dir/last_state.pt`` (optimizer, scheduler, epoch).
    """
    device = device or torch.device("cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=generator,
                              drop_last=True)
    test_loader = DataLoader(test_set, batch_size=256)
    model.to(device)
    optimizer = create_optimizer_v2(model, "adamw", lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=config.epochs * steps_per_epoch, lr_min=config.min_lr,
                                  warmup_t=int(config.warmup_epochs * steps_per_epoch), warmup_lr_init=1e-6,
                                  t_in_epochs=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: List[Dict] = []
    step = 0
    for epoch in range(config.epochs):
        model.train()
        start, loss_sum = time.time(), 0.0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}")
        for images, labels in bar:
            loss = criterion(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_sum += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        train_time = time.time() - start
        metrics = evaluate(model, test_loader, device)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, "test_top1": metrics["top1"],
               "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": round(train_time, 1)}
        history.append(row)
        _append_log(out_dir, row)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "last.safetensors"))
        torch.save({"epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "config": asdict(config)}, out_dir / "last_state.pt")
        on_epoch(row)
    return history


def _append_log(out_dir: Path, row: Dict) -> None:
    csv_path = out_dir / "log.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    with open(out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
