"""Pure tensor functions of Adaptive Token Sampling: token scores and token selection.

Nothing here knows about model classes. Every selection function has the same contract
(a ``Sampler``): ``scores`` (B, n) in, kept patch-token indices (B, K'max) out, sorted
ascending and padded on the right with -1, where K'max is the largest count kept in the batch.
A score that is zero, negative or not finite marks a token that is not eligible: it is never
kept and takes no part in the selection of the others.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

NumSamples = Union[int, Tensor]
Sampler = Callable[[Tensor, NumSamples], Tensor]


def token_scores(
        attn: Tensor,
        v: Tensor,
        num_prefix_tokens: int = 1,
        token_mask: Optional[Tensor] = None,
        value_norm: bool = True,
) -> Tensor:
    """Significance score of each patch token, normalised to sum 1 over each row's real tokens.

    The score of patch token j is the class token's attention to j summed over heads, times the
    norm of j's value vector with all heads concatenated (ATS, Fayyaz et al. 2022, eq. 4);
    without ``value_norm``, the attention alone (the paper's ablation).

    Args:
        attn: softmaxed attention (B, H, Nq, N) whose query row 0 is the class token's;
            usually Nq == N, but only row 0 is read.
        v: values (B, H, N, d).
        num_prefix_tokens: leading tokens (class, distillation, register) that get no score.
        token_mask: bool, False marks padding; (B, N) over all tokens or (B, n) over patch tokens.

    Returns:
        scores (B, n), n = N - num_prefix_tokens, in float32 or wider (float64 inputs stay
        float64); padding scores 0.
    """
    if attn.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attn and v must be 4-D (B, H, Nq, N) and (B, H, N, d), "
                         f"got {tuple(attn.shape)} and {tuple(v.shape)}")
    B, H, _, N = attn.shape
    if v.shape[:3] != (B, H, N):
        raise ValueError(f"v must be (B, H, N, d) = ({B}, {H}, {N}, d), got {tuple(v.shape)}")
    if not 0 < num_prefix_tokens < N + 1 or num_prefix_tokens != int(num_prefix_tokens):
        raise ValueError(f"num_prefix_tokens must be an int in [1, {N}], got {num_prefix_tokens}")
    P = num_prefix_tokens
    dtype = torch.promote_types(torch.promote_types(attn.dtype, v.dtype), torch.float32)
    scores = attn[:, :, 0, P:].sum(dim=1, dtype=dtype)
    if value_norm:
        scores = scores * torch.linalg.vector_norm(v[:, :, P:], dim=(1, 3), dtype=dtype)  # over heads, head dims
    if token_mask is not None:
        if token_mask.shape == (B, N):
            token_mask = token_mask[:, P:]
        if token_mask.shape != scores.shape or token_mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be a bool tensor of shape ({B}, {N}) or "
                             f"({B}, {N - P}), got {token_mask.dtype} {tuple(token_mask.shape)}")
        scores = scores.masked_fill(~token_mask, 0.0)
    total = scores.sum(dim=-1, keepdim=True)
    return scores / total.clamp_min(torch.finfo(scores.dtype).tiny)


def _num_samples_per_row(num_samples: NumSamples, batch: int, device: torch.device) -> Tensor:
    """Validate ``num_samples`` and return it as a (B,) long tensor."""
    if isinstance(num_samples, Tensor):
        if num_samples.dim() != 1 or num_samples.shape[0] != batch or num_samples.is_floating_point():
            raise ValueError(f"num_samples as a tensor must be integer with shape ({batch},), "
                             f"got {num_samples.dtype} {tuple(num_samples.shape)}")
        if batch and int(num_samples.min()) < 1:
            raise ValueError("num_samples must be >= 1 for every row")
        return num_samples.to(device=device, dtype=torch.long)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1 or a (B,) integer tensor, got {num_samples!r}")
    return torch.full((batch,), num_samples, dtype=torch.long, device=device)


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (B, n), got shape {tuple(scores.shape)}")


def _eligible(scores: Tensor) -> Tensor:
    return (scores > 0) & torch.isfinite(scores)


def keep_mask_to_index(keep: Tensor) -> Tensor:
    """Turn a (B, n) bool keep mask into ascending indices (B, K'max) padded with -1."""
    B, n = keep.shape
    kmax = int(keep.sum(dim=1).max()) if B and n else 0
    # Each kept index goes to its rank among the row's kept ones; the rest to a spare column.
    slot = torch.where(keep, keep.cumsum(dim=1) - 1, kmax)
    index = torch.full((B, kmax + 1), -1, dtype=torch.long, device=keep.device)
    index.scatter_(1, slot, torch.arange(n, device=keep.device).expand(B, n))
    return index[:, :kmax]


def inverse_transform_sampling(scores: Tensor, num_samples: NumSamples) -> Tensor:
    """Select tokens by inverse transform sampling on the scores' cumulative distribution.

    Per row, on the eligible (positive, finite) scores only: sort ascending (ties keep index
    order), take the cumulative sum F and min-max normalise it to [0, 1]. Lay a grid of K points
    evenly from y0, the smallest non-zero F, to 1, both ends included (K = 1: the single point 1).
    Each grid point picks the token whose F is nearest (the first on ties); duplicates count once.
    So a row keeps K' <= K distinct tokens, never its lowest-scoring one; a row with a single
    eligible token keeps it and a row with none keeps nothing. Deterministic, no Python loop over
    rows, no gradient.

    Args:
        scores: (B, n) token scores (any positive scale; zero marks a token that is not eligible).
        num_samples: K, an int >= 1 or a (B,) integer tensor with one K per row.

    Returns:
        LongTensor (B, K'max) of kept indices, ascending, padded with -1.
    """
    _check_scores(scores)
    B, n = scores.shape
    k = _num_samples_per_row(num_samples, B, scores.device)
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
    kmax = int(k.max())
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


def topk_sampling(scores: Tensor, num_samples: NumSamples) -> Tensor:
    """Keep the K highest eligible scores of each row (ties: lower index first).

    The paper's ablation baseline; same input and output contract as
    :func:`inverse_transform_sampling`, so a row keeps min(K, eligible tokens).
    """
    _check_scores(scores)
    B, n = scores.shape
    k = _num_samples_per_row(num_samples, B, scores.device)
    s = scores.detach()
    eligible = _eligible(s)
    order = torch.where(eligible, s, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = torch.arange(n, device=s.device)[None, :]
    take = (rank < k[:, None]) & eligible.gather(1, order)
    keep = torch.zeros_like(eligible).scatter(1, order, take)
    return keep_mask_to_index(keep)


def random_sampling(scores: Tensor, num_samples: NumSamples) -> Tensor:
    """Keep K eligible tokens drawn uniformly at random from torch's generator, ignoring the
    scores' values: the no-information selection baseline; same contract as
    :func:`inverse_transform_sampling`."""
    eligible = _eligible(scores.detach())
    draw = torch.rand(scores.shape, dtype=torch.float64, device=scores.device)
    return topk_sampling(torch.where(eligible, draw + 1.0, 0.0), num_samples)
