"""``num_tokens``, the user's budget of one reduction block, and ``k``, what it resolves to for a
batch: checked once here, resolved once here, for every reducer and host."""
from __future__ import annotations

from numbers import Integral, Real
from typing import Tuple, Union

import torch
from .sampling import K
from .tokens import Layout

NumTokens = Union[None, int, float]


def check_one(value: NumTokens) -> NumTokens:
    """One block's ``num_tokens``: None, an int >= 1 or a fraction in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, Integral) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"num_tokens must be >= 1 as an int, got {value}")
        return int(value)
    if isinstance(value, Real) and not isinstance(value, bool):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"num_tokens as a float is a fraction in (0, 1], got {value}")
        return float(value)
    raise TypeError(f"num_tokens must be None, an int >= 1 or a float in (0, 1], got {value!r}")


def check_num_tokens(num_tokens, num_blocks: int) -> Tuple[NumTokens, ...]:
    """``num_tokens`` as one checked value per reduction block (a single value serves them all)."""
    if isinstance(num_tokens, (list, tuple)):
        if len(num_tokens) != num_blocks:
            raise ValueError(f"num_tokens has {len(num_tokens)} values; it needs one per ATS block ({num_blocks})")
        return tuple(check_one(v) for v in num_tokens)
    return (check_one(num_tokens),) * num_blocks


def resolve_k(num_tokens: NumTokens, layout: Layout, num_prefix: int, num_patches: int) -> K:
    """K of an ATS block entered by ``layout``'s tokens: the input's patch count for None, the
    int itself, or per image (B,) that fraction of its entering patch tokens, rounded, at least 1."""
    if num_tokens is None:
        return num_patches
    if isinstance(num_tokens, float):
        entering = (layout.counts() - num_prefix).to(torch.float64)
        return (entering * num_tokens).round().clamp(min=1).long()
    return num_tokens


def uniform_k(num_tokens: NumTokens, entering: int) -> int:
    """Patch tokens a block keeps out of ``entering`` when every image keeps the same count
    (EViT, ToMe): None keeps all."""
    if num_tokens is None:
        return entering
    return min(entering, num_tokens if isinstance(num_tokens, int) else max(1, round(entering * num_tokens)))
