"""One process or many under ``torchrun``: process group set-up, sharding and gathering.

Jobs call :func:`setup` once; everything else is a no-op for a single process, so the same code
runs unchanged alone and under ``torchrun --nproc_per_node N`` (gloo on the CPU, NCCL on GPUs).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .errors import UserError

@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints, times and writes files."""
        return self.rank == 0


@contextmanager
def setup(device: str) -> Iterator[Tuple[Dist, torch.device]]:
    """Join the ``torchrun`` process group if there is one, and pick this process's device.

    Yields (Dist, device); the group is torn down on exit.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Dist(), torch.device(device)
        return
    cuda = torch.device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield (Dist(dist.get_rank(), dist.get_world_size(), local_rank),
               torch.device("cuda", local_rank) if cuda else torch.device(device))
    finally:
        dist.destroy_process_group()


def shard(dataset: Dataset, d: Dist) -> Dataset:
    """This rank's contiguous block of ``dataset``; blocks in rank order are the whole dataset,
    each image once (no padding, unlike ``DistributedSampler``), so metrics gathered in rank
    order equal a single process's."""
    n = len(dataset)
    if d.world > n:
        raise UserError(f"{d.world} processes for {n} images: run at most {n} processes (--nproc_per_node)")
    start, stop = d.rank * n // d.world, (d.rank + 1) * n // d.world
    return dataset if d.world == 1 else Subset(dataset, range(start, stop))


def gather(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's ``tensor`` (first dimensions may differ) concatenated in rank order, on all ranks."""
    if d.world == 1:
        return tensor
    device = torch.device("cuda", d.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype = tensor.dtype
    local = tensor.to(device, torch.uint8 if dtype == torch.bool else dtype)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(d.world)]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])
    return out.to(tensor.device, dtype)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
