"""Token selection: pure tensor functions, chosen by name through :data:`SAMPLERS`.

Every sampler has the same contract (a ``Sampler``): ``scores`` (B, n) and ``k`` in, kept
patch-token indices (B, W) out, sorted ascending and padded on the right with -1. W is K'max,
the largest count kept in the batch, on the CPU; on an accelerator the built-in samplers keep
W = n, so that they never wait for the device (the block trims it in its one host read). A score that is zero, negative or not finite marks a
token that is not eligible: it is never kept and takes no part in the selection of the others.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import native
from .registry import Registry
from .tokens import HOST_DEVICES, host_values

K = Union[int, Tensor]  # k: an int for every image, or a (B,) integer tensor, one per image
Sampler = Callable[[Tensor, K], Tensor]


def k_per_row(k: K, batch: int, device: torch.device) -> Tensor:
    """Check ``k`` and return it as a (B,) long tensor (a tensor's values are checked where
    reading them costs nothing: on the CPU)."""
    if isinstance(k, Tensor):
        if k.dim() != 1 or k.shape[0] != batch or k.is_floating_point():
            raise ValueError(f"k as a tensor must be integer with shape ({batch},), got {k.dtype} {tuple(k.shape)}")
        if batch and k.device.type in HOST_DEVICES and int(k.min()) < 1:
            raise ValueError("k must be >= 1 for every row")
        return k.to(device=device, dtype=torch.long)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 or a (B,) integer tensor, got {k!r}")
    return torch.full((batch,), k, dtype=torch.long, device=device)


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (B, n), got shape {tuple(scores.shape)}")


def _eligible(scores: Tensor) -> Tensor:
    return (scores > 0) & torch.isfinite(scores)


def keep_mask_to_index(keep: Tensor) -> Tensor:
    """Turn a (B, n) bool keep mask into ascending indices (B, W) padded with -1: W = K'max on
    the CPU, n elsewhere (no host read)."""
    B, n = keep.shape
    if keep.device.type not in HOST_DEVICES:
        kmax = n
    else:
        kmax = host_values(keep.sum(dim=1).max()) if B and n else 0
    # Each kept index goes to its rank among the row's kept ones; the rest to a spare column.
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, kmax)
    index = torch.full((B, kmax + 1), -1, dtype=torch.long, device=keep.device)
    index.scatter_(1, slot, torch.arange(n, device=keep.device).expand(B, n))
    return index[:, :kmax]


def inverse_transform_sampling(scores: Tensor, k: K) -> Tensor:
    """Select tokens by inverse transform sampling on the scores' cumulative distribution.

    Per row, on the eligible (positive, finite) scores only: sort ascending (ties keep index
    order), take the cumulative sum F and min-max normalise it to [0, 1]. Lay a grid of K points
    evenly from y0, the smallest non-zero F, to 1, both ends included (K = 1: the single point 1).
    Each grid point picks the token whose F is nearest (the first on ties); duplicates count once.
    So a row keeps K' <= K distinct tokens, never its lowest-scoring one; a row with a single
    eligible token keeps it and a row with none keeps nothing. Deterministic, no Python loop over
    rows, no gradient. On the CPU one native op (``torch.ops.ats_vit.inverse_transform``, see
    :mod:`ats_vit.core.native`) does it all; elsewhere :func:`inverse_transform_reference`.

    Args:
        scores: (B, n) token scores (any positive scale; zero marks a token that is not eligible).
        k: K, an int >= 1 or a (B,) integer tensor with one K per row.

    Returns:
        LongTensor (B, W) of kept indices, ascending, padded with -1 (W: see the module). An int
        K needs no host read on an accelerator; a per-image K needs one, for the grid's width.
    """
    _check_scores(scores)
    B, n = scores.shape
    grid_width = k if isinstance(k, int) else None
    k = k_per_row(k, B, scores.device)
    if scores.device.type == "cpu" and native.available():
        return torch.ops.ats_vit.inverse_transform(scores.detach(), k)
    return inverse_transform_reference(scores, k, grid_width)


def inverse_transform_reference(scores: Tensor, k: Tensor, grid_width: Optional[int] = None) -> Tensor:
    """:func:`inverse_transform_sampling` in PyTorch operations, for any device: the twin of
    the native CPU op (same picks, bit for bit), used where that op is not available. ``k`` is
    (B,) long, already checked; ``grid_width``, its largest value when the caller knows it."""
    B, n = scores.shape
    if B == 0 or n == 0:
        return torch.empty(B, 0, dtype=torch.long, device=scores.device)
    s = scores.detach().to(torch.float64)
    eligible = _eligible(s)
    s = torch.where(eligible, s, 0.0)
    s_sorted, order = s.sort(dim=1, stable=True)  # ineligible (zero) scores come first
    cdf = s_sorted.cumsum(dim=1)
    m = eligible.sum(dim=1)
    first = (n - m).clamp(max=n - 1)
    low = cdf.gather(1, first[:, None])
    span = cdf[:, -1:] - low
    in_support = torch.arange(n, device=s.device)[None, :] >= (n - m)[:, None]
    cdf = torch.where(in_support, (cdf - low) / span.clamp_min(torch.finfo(s.dtype).tiny), float("-inf"))

    y0 = torch.where(cdf > 0, cdf, float("inf")).amin(dim=1, keepdim=True)
    kmax = host_values(k.max()) if grid_width is None else grid_width
    step = torch.arange(kmax, device=s.device, dtype=s.dtype)[None, :]
    grid = torch.where(k[:, None] > 1, y0 + (1 - y0) * (step / (k[:, None] - 1).clamp(min=1)), 1.0)
    grid_used = (step < k[:, None]) & (m[:, None] >= 2)
    grid = torch.where(grid_used, grid, 1.0)  # rows with fewer than 2 eligible tokens have no y0

    # Nearest CDF value: compare the neighbours on either side of the insertion point.
    right = torch.searchsorted(cdf, grid.contiguous()).clamp(max=n - 1)
    left = (right - 1).clamp(min=0)
    to_left = grid - cdf.gather(1, left)
    to_right = cdf.gather(1, right) - grid
    pick = torch.where(to_left <= to_right, left, right)

    # Invalid grid points write into a spare column that is dropped.
    target = torch.where(grid_used, order.gather(1, pick), n)
    keep = torch.zeros(B, n + 1, dtype=torch.bool, device=s.device)
    keep.scatter_(1, target, True)
    keep = keep[:, :n] | (eligible & (m == 1)[:, None])
    return keep_mask_to_index(keep)


def topk_sampling(scores: Tensor, k: K) -> Tensor:
    """Keep the K highest eligible scores of each row (ties: lower index first).

    The paper's ablation baseline; same input and output contract as
    :func:`inverse_transform_sampling`, so a row keeps min(K, eligible tokens).
    """
    _check_scores(scores)
    B, n = scores.shape
    k = k_per_row(k, B, scores.device)
    s = scores.detach()
    eligible = _eligible(s)
    order = torch.where(eligible, s, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.arange(n, device=s.device)[None, :]
    take = (rank < k[:, None]) & eligible.gather(1, order)
    keep = torch.zeros_like(eligible).scatter(1, order, take)
    return keep_mask_to_index(keep)


def random_sampling(scores: Tensor, k: K) -> Tensor:
    """Keep K eligible tokens drawn uniformly at random from torch's generator, ignoring the
    scores' values: the no-information selection baseline; same contract as
    :func:`inverse_transform_sampling`."""
    eligible = _eligible(scores.detach())
    draw = torch.rand(scores.shape, dtype=torch.float64, device=scores.device)
    return topk_sampling(torch.where(eligible, draw + 1.0, 0.0), k)


SAMPLERS: Registry[Sampler] = Registry("sampler", {
    "inverse_transform": inverse_transform_sampling,
    "topk": topk_sampling,
    "random": random_sampling,
})


def register_sampler(name: str, sampler: Sampler) -> None:
    """Make ``sampler`` available to :func:`ats_vit.apply` as ``sampler=name``."""
    if not callable(sampler):
        raise TypeError(f"sampler must be callable (scores, k) -> index, got {type(sampler).__name__}")
    SAMPLERS.add(name, sampler)


def list_samplers() -> list[str]:
    """Names accepted by ``sampler=``."""
    return SAMPLERS.names()


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name``; a ValueError lists the allowed names otherwise."""
    return SAMPLERS.get(name)
