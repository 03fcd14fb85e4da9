"""Wall-clock timing of a model alone: warm-up, then the median of repeated runs."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_runs(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> List[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_throughput(model: nn.Module, batch: torch.Tensor, warmup: int = 2, repeats: int = 5) -> float:
    """Images per second of ``model`` on ``batch`` (the median run)."""
    times = time_runs(lambda: model(batch), batch.device, warmup, repeats)
    return len(batch) / statistics.median(times)
