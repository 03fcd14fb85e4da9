"""What every host shares: the patch record, argument checks, the block loop over a
:class:`~ats_vit.core.tokens.Tokens` batch, and the per-image statistics.

A patch swaps the class of one module (the *target*: the timm model itself, a transformers ViT
or DeiT backbone, or a CvT encoder) for a subclass and puts one :class:`Patch` record on it,
under :data:`ATTRIBUTE`; the host says which module is the target of a model.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import partial
from numbers import Integral
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..core.block import dense_block
from ..core.budget import NumTokens, check_num_tokens
from ..core.sampling import get_sampler
from ..core.scoring import get_scorer
from ..core.stats import ATSStats
from ..core.tokens import Layout, Tokens
from ..reducers import REDUCERS, TRAINED

ATTRIBUTE = "_ats_patch"  # the one attribute a patched target carries
POOL_WEIGHT = "ats_pool_weight"  # on the features a patched forward returns: each token's pooling weight
MODES = ("packed", "padded")


@dataclass(frozen=True)
class PatchConfig:
    """The checked arguments of :func:`ats_vit.apply`, one budget per reduction block."""
    blocks: Tuple[int, ...]
    num_tokens: Tuple[NumTokens, ...]
    sampler: str = "inverse_transform"
    mode: str = "packed"
    scorer: str = "cls_value"
    reducer: str = "ats"


class LastForward(threading.local):
    """What the last forward in the calling thread left, for :func:`ats_vit.last_stats` and a
    trained reducer's loss: per thread, so threads sharing one patched model never read one
    another's. Nothing a forward computes with is kept here (pooling weights travel on the
    features, see :data:`POOL_WEIGHT`)."""
    stats: Union[None, ATSStats, Callable[[], ATSStats]] = None  # built when first asked for
    keep_masks: Tuple[Tensor, ...] = ()  # training keep mask after each reducing block
    features: Optional[Tensor] = None  # a masked training forward's final normed tokens


@dataclass
class Patch:
    """Everything a patched model holds: its config, the host's block records (``parts``) and
    cost model, the target's class before the patch (for :func:`remove`), a trained reducer's
    modules, and (per thread) what the last forward left."""
    config: PatchConfig
    parts: tuple
    cost: object
    original_class: type
    learned: Dict[int, nn.Module] = field(default_factory=dict)  # a trained reducer's module per block
    last: LastForward = field(default_factory=LastForward, repr=False, compare=False)

    def last_stats(self) -> Optional[ATSStats]:
        """The calling thread's last forward's statistics (None before any), built once."""
        if callable(self.last.stats):
            self.last.stats = self.last.stats()
        return self.last.stats

    def __getstate__(self) -> dict:  # pickled and copied without the last forward's record
        return {k: v for k, v in self.__dict__.items() if k != "last"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, last=LastForward())


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


def reducer_blocks(placement: Tuple[int, Sequence[int]], reducer: str) -> Tuple[int, ...]:
    """The blocks a reducer goes in by default: the host's default, except DynamicViT's three
    stages at a quarter, half and three quarters of the depth (3, 6, 9 of 12, the paper's)."""
    depth, default = placement
    return tuple(sorted({depth * s // 4 for s in (1, 2, 3)})) if reducer in TRAINED else tuple(default)


def checked_config(placement: Tuple[int, Sequence[int]], blocks, num_tokens, sampler: str, mode: str, scorer: str,
                   reducer: str, reducers: Sequence[str] = tuple(REDUCERS)) -> PatchConfig:
    """Every argument of :func:`ats_vit.apply` checked, as a config; ``placement`` is the host's
    (block count, default blocks), ``reducers`` those it supports."""
    block_ids = check_blocks(blocks, placement[0], reducer_blocks(placement, reducer))
    budgets = check_num_tokens(num_tokens, len(block_ids))
    get_sampler(sampler)
    get_scorer(scorer)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if reducer not in reducers:
        raise ValueError(f"reducer must be one of {list(reducers)}, got {reducer!r}")
    if reducer != "ats" and (sampler, scorer) != ("inverse_transform", "cls_value"):
        raise ValueError(f"sampler and scorer apply to reducer='ats' only, not {reducer!r}")
    return PatchConfig(block_ids, budgets, sampler, mode, scorer, reducer)


def check_unpatched(target: nn.Module) -> None:
    if hasattr(target, ATTRIBUTE):
        raise ValueError("ATS is already applied to this model; call ats_vit.remove(model) first")


_CLASSES: Dict[Tuple[type, type], type] = {}


def patched_class(cls: type, methods: type) -> type:
    """The class of a ``cls`` patched with ``methods``' methods in front (one per pair, so
    instances share it)."""
    if (cls, methods) not in _CLASSES:
        # The host library's module, so the patched model is still told apart as that library's;
        # pickled as its two importable parts (see _reduce).
        _CLASSES[cls, methods] = type(f"ATS{cls.__name__}", (methods, cls),
                                      {"__module__": cls.__module__, "__reduce_ex__": _reduce})
    return _CLASSES[cls, methods]


def _reduce(self: nn.Module, protocol: int):
    """Pickle (torch.save, deepcopy, multiprocessing) a patched module as its original class, the
    host's methods and its state: unpickling rebuilds the same patched module."""
    cls, methods = type(self).__bases__[1], type(self).__bases__[0]
    return _rebuild, (cls, methods, self.__dict__.copy())


def _rebuild(cls: type, methods: type, state: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    module.__class__ = patched_class(cls, methods)
    return module


def install(target: nn.Module, methods: type, patch: Patch) -> None:
    """Put ``patch`` on ``target`` and swap its class for one with ``methods``' methods in front."""
    setattr(target, ATTRIBUTE, patch)
    target.__class__ = patched_class(type(target), methods)


def uninstall(target: nn.Module) -> None:
    """Undo :func:`install`: the target computes exactly what it computed before."""
    target.__class__ = getattr(target, ATTRIBUTE).original_class
    delattr(target, ATTRIBUTE)


def patch_of(target: nn.Module) -> Patch:
    """The record of the patch whose target is ``target``."""
    return getattr(target, ATTRIBUTE)


def run_blocks(blocks: Sequence, x: Tensor, num_prefix: int, patch: Patch, grad_checkpointing: bool = False,
               reduce: Optional[Callable] = None, dense: Callable = dense_block, cost=None) -> Tokens:
    """Run ``blocks`` on the embedded tokens ``x`` (B, N, C), reducing at the patched blocks;
    returns the tokens leaving the last block and records the forward's statistics in ``patch``.

    By default the blocks are :class:`~ats_vit.core.parts.BlockParts` run through the config's
    reducer step (see :mod:`ats_vit.reducers`) and :func:`~ats_vit.core.block.dense_block`; a
    host with other blocks passes its own ``reduce`` (with a reducer step's arguments) and
    ``dense`` (block, tokens), and a ``cost`` model bound to the input size. The statistics are
    the calling thread's (:class:`LastForward`)."""
    refuse_tracing()
    config = patch.config
    reduce = REDUCERS[config.reducer] if reduce is None else reduce
    P = num_prefix
    B, N, _ = x.shape
    n = N - P

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if grad_checkpointing else fn(*args)

    layout = Layout.dense(B, N, x.device, packed=config.mode == "packed")
    tokens = Tokens(x.flatten(0, 1), layout, torch.arange(n, device=x.device).expand(B, n))
    counts, positions, keep_masks = [layout.counts()], [], []
    budgets = dict(zip(config.blocks, config.num_tokens))
    for i, blk in enumerate(blocks):
        if i in budgets:
            tokens = run(reduce, blk, tokens, P, budgets[i], n, config.sampler, config.scorer, patch.learned.get(i))
            positions.append(tokens.positions)
            if tokens.keep is not None:
                keep_masks.append(tokens.keep)
        else:
            tokens = run(dense, blk, tokens)
        counts.append(tokens.layout.counts())
    patch.last.keep_masks = tuple(keep_masks)
    patch.last.stats = partial(make_stats, config, patch.cost if cost is None else cost, n, P, counts, tuple(positions))
    return tokens


def refuse_tracing() -> None:
    """One clear error for the tracers that cannot record ATS (each image's kept count is data):
    ``torch.jit.trace`` would freeze the example's counts, and ``torch.export`` needs the counts as
    unbacked sizes, which the patched forward does not give it yet. ``torch.compile`` works."""
    if torch.jit.is_tracing():
        raise RuntimeError("torch.jit.trace cannot record a model with ATS applied: each image keeps its own number "
                           "of tokens, which a trace would fix to the example's; use torch.compile, or trace the "
                           "model before ats_vit.apply")
    if torch.compiler.is_exporting():
        raise RuntimeError("torch.export does not support a model with ATS applied yet (each image keeps its own "
                           "number of tokens); use torch.compile, or export the model before ats_vit.apply")


def make_stats(config: PatchConfig, cost, num_patches: int, num_prefix: int, counts: Sequence[Tensor],
               positions: Tuple[Tensor, ...]) -> ATSStats:
    """Statistics of one forward from the token ``counts`` (B,) entering each block, then leaving
    the last."""
    token_counts = torch.stack(counts, dim=1)
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
