"""Wall-clock timing of models alone (interleaved rounds, medians), peak forward memory, and the
share of a forward spent inside named profiler ranges."""
from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def interleaved_times(fns: Sequence[Callable[[], object]], device: torch.device, warmup: int = 2,
                      repeats: int = 5) -> List[List[float]]:
    """Seconds of each timed call of each of ``fns``: every round calls each once in turn, after
    ``warmup`` untimed rounds, so a machine whose speed drifts slows them all alike."""
    return [[sum(call) for call in calls] for calls in _interleaved([[fn] for fn in fns], device, warmup, repeats)]


def _interleaved(parts: Sequence[Sequence[Callable[[], object]]], device: torch.device, warmup: int,
                 repeats: int) -> List[List[List[float]]]:
    """For each entry of ``parts`` (a list of calls that make one round of it), per timed round,
    the seconds of each call: every round runs each entry's calls in turn."""
    for _ in range(warmup):
        for calls in parts:
            for call in calls:
                call()
    _sync(device)
    times: List[List[List[float]]] = [[] for _ in parts]
    for _ in range(repeats):
        for calls, record in zip(parts, times):
            seconds = []
            for call in calls:
                start = time.perf_counter()
                call()
                _sync(device)
                seconds.append(time.perf_counter() - start)
            record.append(seconds)
    return times


class Speed(NamedTuple):
    """One model's timing on one set of images."""
    images_per_s: float  # from the median time of a round over the images
    speedup: float  # over the first model compared: the median of the rounds' paired time ratios
    median_ms: float  # latency of one forward (of batch_size images)
    p90_ms: float  # the 90th percentile (nearest rank) of that latency


def compare_throughput(models: Sequence[Callable[[torch.Tensor], object]], batch: torch.Tensor, warmup: int = 2,
                       repeats: int = 5, batch_size: Optional[int] = None) -> List[Speed]:
    """The :class:`Speed` of each model on ``batch``, timed in interleaved rounds. A round runs a
    model over all of ``batch`` in forwards of ``batch_size`` images (default: one forward), so at
    batch 1 each image's own token counts are in the time, not one image's."""
    chunks = batch.split(batch_size or len(batch))
    times = _interleaved([[functools.partial(m, c) for c in chunks] for m in models], batch.device, warmup, repeats)
    totals = [[sum(r) for r in t] for t in times]
    speeds = []
    for rounds, total in zip(times, totals):
        forwards = sorted(s for r in rounds for s in r)
        speeds.append(Speed(len(batch) / statistics.median(total),
                            statistics.median(b / x for b, x in zip(totals[0], total)),
                            1000 * statistics.median(forwards),
                            1000 * forwards[math.ceil(0.9 * len(forwards)) - 1]))  # nearest rank
    return speeds


@torch.no_grad()
def peak_forward_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Peak bytes allocated during one forward, above what was allocated before it.

    On CUDA this is the caching allocator's own peak; on the CPU, where torch keeps no such
    statistic, it is the running total of the profiler's allocation and free events."""
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
        base = torch.cuda.memory_allocated(batch.device)
        torch.cuda.reset_peak_memory_stats(batch.device)
        model(batch)
        torch.cuda.synchronize(batch.device)
        return torch.cuda.max_memory_allocated(batch.device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(batch)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate(e.nbytes() for e in events), default=0)


@torch.no_grad()
def range_share(model: nn.Module, batch: torch.Tensor, name: str, rounds: int = 5) -> float:
    """Fraction of a forward's time spent inside the profiler ranges called ``name``: CPU time
    on the CPU, the time of the kernels launched inside them on CUDA. The median over ``rounds``
    profiled forwards: one forward's share swings with the machine's noise (a single one once read
    92% of a forward whose share is nearer 10%)."""
    cuda = batch.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    spent = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    shares = []
    for _ in range(rounds):
        with profile(activities=activities) as prof:
            with record_function("forward"):
                model(batch)
            _sync(batch.device)
        events = prof.events()
        total = sum(spent(e) for e in events if e.name == "forward")
        shares.append(sum(spent(e) for e in events if e.name == name) / total)
    return statistics.median(shares)
