"""What every host library's patch shares: argument checks, the patch record, the block loop
over a :class:`~ats_vit.block.Tokens` batch, and the per-image statistics.

A patch swaps the class of one module (the *target*: the timm model itself, or a transformers
backbone) for a subclass, and keeps an :class:`ATSConfig` on the model the user passed in, so
:func:`remove` and :func:`last_stats` work the same for every host.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..block import Layout, Tokens, ats_block, dense_block, evit_block, tome_block
from ..registry import get_sampler, get_scorer
from ..stats import ATSStats

TokenBudget = Union[None, int, float]
CONFIG = "_ats_config"  # on the model the user passed in
PATCH = "_ats_patch"  # the same config, on the target
LAST = "_ats_last"  # the target's last statistics
MODES = ("packed", "padded")
REDUCER_NAMES = ("ats", "evit", "tome")


@dataclass(frozen=True)
class ATSConfig:
    """How a model was patched; kept on the model, outside its state dict.

    cost: the host's cost model, with ``macs(num_patches, tokens, blocks, kind, prefix, rows)``
    and ``dense_macs(num_patches, prefix)`` (see :mod:`ats_vit.flops`).
    target: the module whose class was swapped for ``patched_class``; ``original_class`` is its
    class before.
    """
    blocks: Tuple[int, ...]
    num_tokens: Tuple[TokenBudget, ...]
    sampler: str
    mode: str
    scorer: str = "cls_value"
    reducer: str = "ats"
    cost: object = None
    original_class: Optional[type] = None
    target: Optional[nn.Module] = field(default=None, compare=False, repr=False)


def check_blocks(blocks: Union[None, int, Sequence[int]], depth: int, default: Sequence[int]) -> Tuple[int, ...]:
    """Sorted block indices in 0..depth-1; None means ``default``; an empty list patches no block
    (the model then only records tokens and GMACs)."""
    allowed = f"allowed: block indices in 0..{depth - 1}"
    if blocks is None:
        blocks = default
    elif isinstance(blocks, Integral) and not isinstance(blocks, bool):
        blocks = [blocks]
    try:
        blocks = list(blocks)
    except TypeError:
        raise TypeError(f"blocks must be a list of ints or None, got {type(blocks).__name__}") from None
    for i in blocks:
        if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < depth:
            raise ValueError(f"blocks contains {i!r}; {allowed}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks contains duplicates: {blocks}")
    return tuple(sorted(int(i) for i in blocks))


def _check_budget(value: TokenBudget) -> TokenBudget:
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


def check_num_tokens(num_tokens, num_blocks: int) -> Tuple[TokenBudget, ...]:
    if isinstance(num_tokens, (list, tuple)):
        if len(num_tokens) != num_blocks:
            raise ValueError(f"num_tokens has {len(num_tokens)} values; it needs one per ATS block ({num_blocks})")
        return tuple(_check_budget(v) for v in num_tokens)
    return (_check_budget(num_tokens),) * num_blocks


def checked_config(placement: Tuple[int, Sequence[int]], blocks, num_tokens, sampler: str, mode: str, scorer: str,
                   reducer: str, reducers: Sequence[str] = tuple(REDUCER_NAMES)) -> ATSConfig:
    """Every argument of :func:`ats_vit.apply` checked, as a config (no cost, no target yet);
    ``placement`` is the host's (block count, default blocks), ``reducers`` those it supports."""
    block_ids = check_blocks(blocks, *placement)
    budgets = check_num_tokens(num_tokens, len(block_ids))
    get_sampler(sampler)
    get_scorer(scorer)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if reducer not in reducers:
        raise ValueError(f"reducer must be one of {list(reducers)}, got {reducer!r}")
    if reducer != "ats" and (sampler, scorer) != ("inverse_transform", "cls_value"):
        raise ValueError(f"sampler and scorer apply to reducer='ats' only, not {reducer!r}")
    return ATSConfig(block_ids, budgets, sampler, mode, scorer, reducer)


def check_unpatched(model: nn.Module) -> None:
    if hasattr(model, CONFIG):
        raise ValueError("ATS is already applied to this model; call ats_vit.remove(model) first")


def install(model: nn.Module, target: nn.Module, patched_class: type, config: ATSConfig, cost) -> nn.Module:
    """Swap ``target``'s class for ``patched_class`` and record ``config``, with the host's
    ``cost`` model, on ``model``."""
    config = replace(config, cost=cost, target=target, original_class=type(target))
    target.__class__ = patched_class
    setattr(model, CONFIG, config)
    setattr(target, PATCH, config)
    setattr(target, LAST, None)
    return model


def config_of(target: nn.Module) -> ATSConfig:
    """The config of the patch whose target is ``target``."""
    return getattr(target, PATCH)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`ats_vit.apply`: the model computes exactly what it computed before."""
    config: Optional[ATSConfig] = getattr(model, CONFIG, None)
    if config is None:
        raise ValueError("model is not patched with ATS (ats_vit.apply was never called on it)")
    config.target.__class__ = config.original_class
    for name in [n for n in vars(config.target) if n.startswith("_ats_")]:
        delattr(config.target, name)
    if hasattr(model, CONFIG):
        delattr(model, CONFIG)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ATS is applied to ``model``."""
    return hasattr(model, CONFIG)


def last_stats(model: nn.Module) -> ATSStats:
    """Tokens kept, their positions and GMACs per image in the model's last forward."""
    if not is_patched(model):
        raise ValueError("model is not patched with ATS; call ats_vit.apply(model) first")
    stats = getattr(getattr(model, CONFIG).target, LAST)
    if stats is None:
        raise ValueError("no forward has run since ats_vit.apply; run the model first")
    return stats


_CLASSES: Dict[Tuple[type, type], type] = {}


def patched_class(cls: type, methods: type) -> type:
    """``cls`` with ``methods``' methods in front (one class per pair, so instances share it)."""
    if (cls, methods) not in _CLASSES:
        _CLASSES[cls, methods] = type(f"ATS{cls.__name__}", (methods, cls), {})
    return _CLASSES[cls, methods]


def _uniform_budget(value: TokenBudget, entering: int) -> int:
    """Patch tokens an EViT/ToMe block keeps out of ``entering`` (the same for every image)."""
    if value is None:
        return entering
    return min(entering, value if isinstance(value, int) else max(1, round(entering * value)))


def budget(value: TokenBudget, tokens: Tokens, num_patches: int, num_prefix: int):
    """K of an ATS block: an int, or (B,) per image for a fractional budget."""
    if value is None:
        return num_patches
    if isinstance(value, float):
        entering = (tokens.layout.counts() - num_prefix).to(torch.float64)
        return (entering * value).round().clamp(min=1).long()
    return value


def _reduce_ats(block: nn.Module, tokens: Tokens, num_prefix: int, value: TokenBudget, num_patches: int,
                config: ATSConfig) -> Tokens:
    k = budget(value, tokens, num_patches, num_prefix)
    return ats_block(block, tokens, num_prefix, k, get_sampler(config.sampler), get_scorer(config.scorer).fn)


def _reduce_evit(block: nn.Module, tokens: Tokens, num_prefix: int, value: TokenBudget, num_patches: int,
                 config: ATSConfig) -> Tokens:
    return evit_block(block, tokens, num_prefix, _uniform_budget(value, tokens.layout.shape[1] - num_prefix))


def _reduce_tome(block: nn.Module, tokens: Tokens, num_prefix: int, value: TokenBudget, num_patches: int,
                 config: ATSConfig) -> Tokens:
    entering = tokens.layout.shape[1] - num_prefix
    return tome_block(block, tokens, num_prefix, entering - _uniform_budget(value, entering))


# Every reducer runs one block on a token batch: (block, tokens, prefix count, its budget, the
# input's patch count, the patch config) -> tokens.
REDUCERS = dict(zip(REDUCER_NAMES, (_reduce_ats, _reduce_evit, _reduce_tome)))


def run_blocks(blocks: Sequence, x: Tensor, num_prefix: int, config: ATSConfig, grad_checkpointing: bool = False,
               reduce: Optional[Callable] = None, dense: Callable = dense_block, cost=None) -> Tuple[Tokens, ATSStats]:
    """Run ``blocks`` on the embedded tokens ``x`` (B, N, C), reducing at the patched blocks; the
    tokens leaving the last block and the forward's statistics.

    By default the blocks are timm-style (timm ``Block``, or a view with its interface) and run
    through the config's reducer and :func:`~ats_vit.block.dense_block`; a host with other blocks
    passes its own ``reduce`` (with a reducer's arguments) and ``dense`` (block, tokens), and a
    ``cost`` model for :func:`make_stats`."""
    reduce = REDUCERS[config.reducer] if reduce is None else reduce
    P = num_prefix
    B, N, _ = x.shape
    n = N - P

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if grad_checkpointing else fn(*args)

    layout = Layout.dense(B, N, x.device, packed=config.mode == "packed")
    tokens = Tokens(x.flatten(0, 1), layout, torch.arange(n, device=x.device).expand(B, n))
    counts, positions = [layout.counts()], []
    budgets = dict(zip(config.blocks, config.num_tokens))
    for i, blk in enumerate(blocks):
        if i in budgets:
            tokens = run(reduce, blk, tokens, P, budgets[i], n, config)
            positions.append(tokens.positions)
        else:
            tokens = run(dense, blk, tokens)
        counts.append(tokens.layout.counts())
    return tokens, make_stats(config, n, P, torch.stack(counts, dim=1), tuple(positions), cost)


def make_stats(config: ATSConfig, num_patches: int, num_prefix: int, token_counts: Tensor,
               positions: Tuple[Tensor, ...], cost=None) -> ATSStats:
    """Statistics of one forward from the tokens (B, depth + 1) entering each block; ``cost``
    replaces ``config.cost`` (for a cost model bound to the input size)."""
    cost = config.cost if cost is None else cost
    return ATSStats(
        blocks=config.blocks,
        num_patches=num_patches,
        num_kept=token_counts[:, [i + 1 for i in config.blocks]] - num_prefix,
        positions=positions,
        tokens=token_counts,
        gmacs=cost.macs(num_patches, token_counts, config.blocks, config.reducer, num_prefix,
                               get_scorer(config.scorer).query_rows) / 1e9,
        dense_gmacs=cost.dense_macs(num_patches, num_prefix) / 1e9,
    )
