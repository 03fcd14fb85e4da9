"""Apply Adaptive Token Sampling to timm ``VisionTransformer`` models, and undo it.

The model's class is swapped for a subclass whose ``forward_features`` runs the blocks on a
:class:`~ats_vit.block.Tokens` batch; parameters, buffers and state-dict keys are untouched,
and :func:`remove` swaps the original class back.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..block import Layout, Tokens, ats_block, dense_block, evit_block, tome_block
from ..flops import ViTCost
from ..registry import get_sampler, get_scorer
from ..stats import ATSStats

TokenBudget = Union[None, int, float]
_CONFIG = "_ats_config"
_LAST = "_ats_last"
_VALID = "_ats_valid"
_SIZE = "_ats_size"
_POOLS = ("", "token", "avg", "max", "avgmax")
MODES = ("packed", "padded")


@dataclass(frozen=True)
class ATSConfig:
    """How a model was patched; kept on the model, outside its state dict."""
    blocks: Tuple[int, ...]
    num_tokens: Tuple[TokenBudget, ...]
    sampler: str
    mode: str
    cost: ViTCost
    original_class: type
    scorer: str = "cls_value"
    reducer: str = "ats"


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or a subclass), got {type(model).__name__}")
    if hasattr(model, _CONFIG):
        raise ValueError("ATS is already applied to this model; call ats_vit.remove(model) first")
    if not model.has_class_token or getattr(model, "cls_token", None) is None:
        raise ValueError("model has no class token: ATS scores patch tokens by the class token's attention")
    if type(model).forward_features is not VisionTransformer.forward_features:
        raise TypeError(f"{type(model).__name__} overrides forward_features; ATS cannot serve it correctly")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in _POOLS:
        raise ValueError(f"global_pool {model.global_pool!r} is not supported; allowed: {list(_POOLS)}")
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("models with patch dropout (patch_drop_rate > 0) are not supported: "
                         "it discards patches before ATS can record their positions")
    if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d) or \
            getattr(model.patch_embed, "backbone", None) is not None:
        raise TypeError(f"patch_embed {type(model.patch_embed).__name__} is not supported; "
                        "ATS needs timm's PatchEmbed (a convolutional patch projection)")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise TypeError(f"block {i} is {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}; "
                            "ATS supports timm's standard Block with Attention only")


def _check_blocks(blocks: Union[None, int, Sequence[int]], depth: int) -> Tuple[int, ...]:
    allowed = f"allowed: block indices in 0..{depth - 1}"
    if blocks is None:
        blocks = range(3, depth)
    elif isinstance(blocks, Integral) and not isinstance(blocks, bool):
        blocks = [blocks]
    try:
        blocks = list(blocks)
    except TypeError:
        raise TypeError(f"blocks must be a list of ints or None, got {type(blocks).__name__}") from None
    if not blocks:
        raise ValueError(f"blocks must name at least one block; {allowed}")
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


def _check_num_tokens(num_tokens, num_blocks: int) -> Tuple[TokenBudget, ...]:
    if isinstance(num_tokens, (list, tuple)):
        if len(num_tokens) != num_blocks:
            raise ValueError(f"num_tokens has {len(num_tokens)} values; it needs one per ATS block ({num_blocks})")
        return tuple(_check_budget(v) for v in num_tokens)
    return (_check_budget(num_tokens),) * num_blocks


def apply(
        model: nn.Module,
        blocks: Union[None, int, Sequence[int]] = None,
        num_tokens: Union[TokenBudget, Sequence[TokenBudget]] = None,
        sampler: str = "inverse_transform",
        mode: str = "packed",
        scorer: str = "cls_value",
        reducer: str = "ats",
) -> nn.Module:
    """Put ATS (or, for comparison, another token reducer) into ``model`` in place and return it.

    Args:
        model: a timm ``VisionTransformer`` (any subclass built on its standard blocks).
        blocks: ATS block indices; None means every block from 3 to the last (the paper's DeiT-S
            placement).
        num_tokens: K, the most patch tokens an ATS block keeps: None (the input's patch count,
            the released configuration), an int >= 1, a float in (0, 1] (that fraction of the patch
            tokens entering the block, per image, rounded, at least 1), or a list of those, one per
            ATS block.
        sampler: a name from :func:`ats_vit.list_samplers` (``"inverse_transform"``, ``"topk"``).
        mode: ``"packed"`` runs the layers after an ATS block on the kept tokens only;
            ``"padded"`` pads every image to the batch's largest count, as the released
            implementation does. Both compute the same outputs.
        scorer: how ATS scores tokens, a name from :func:`ats_vit.list_scorers`: ``"cls_value"``
            (the paper's), ``"cls"`` (without the value norm), ``"all_queries"``, ``"random"``.
        reducer: ``"ats"``; or the rivals ``"evit"`` (keep the ``num_tokens`` patch tokens the
            class token attends to most, fuse the rest into one) and ``"tome"`` (merge patch
            tokens by bipartite soft matching down to ``num_tokens``, at most half per block),
            for which ``sampler`` and ``scorer`` do not apply and ``None`` means no reduction.
    """
    _check_model(model)
    block_ids = _check_blocks(blocks, len(model.blocks))
    budgets = _check_num_tokens(num_tokens, len(block_ids))
    get_sampler(sampler)
    get_scorer(scorer)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if reducer not in _REDUCERS:
        raise ValueError(f"reducer must be one of {list(_REDUCERS)}, got {reducer!r}")
    if reducer != "ats" and (sampler, scorer) != ("inverse_transform", "cls_value"):
        raise ValueError(f"sampler and scorer apply to reducer='ats' only, not {reducer!r}")
    config = ATSConfig(block_ids, budgets, sampler, mode, ViTCost.of(model), type(model), scorer, reducer)
    model.__class__ = _patched_class(type(model))
    setattr(model, _CONFIG, config)
    setattr(model, _LAST, None)
    setattr(model, _VALID, None)
    setattr(model, _SIZE, None)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model computes exactly what it computed before."""
    config = getattr(model, _CONFIG, None)
    if config is None:
        raise ValueError("model is not patched with ATS (ats_vit.apply was never called on it)")
    model.__class__ = config.original_class
    for name in (_CONFIG, _LAST, _VALID, _SIZE):
        delattr(model, name)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ATS is applied to ``model``."""
    return hasattr(model, _CONFIG)


def last_stats(model: nn.Module) -> ATSStats:
    """Tokens kept, their positions and GMACs per image in the model's last forward."""
    if not is_patched(model):
        raise ValueError("model is not patched with ATS; call ats_vit.apply(model) first")
    stats = getattr(model, _LAST)
    if stats is None:
        raise ValueError("no forward has run since ats_vit.apply; run the model first")
    return stats


def _uniform_budget(value: TokenBudget, entering: int) -> int:
    """Patch tokens an EViT/ToMe block keeps out of ``entering`` (the same for every image)."""
    if value is None:
        return entering
    return min(entering, value if isinstance(value, int) else max(1, round(entering * value)))


def _budget(value: TokenBudget, tokens: Tokens, num_patches: int, num_prefix: int):
    if value is None:
        return num_patches
    if isinstance(value, float):
        entering = (tokens.layout.counts() - num_prefix).to(torch.float64)
        return (entering * value).round().clamp(min=1).long()
    return value


def _reduce_ats(block: nn.Module, tokens: Tokens, num_prefix: int, value: TokenBudget, num_patches: int,
                config: ATSConfig) -> Tokens:
    k = _budget(value, tokens, num_patches, num_prefix)
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
_REDUCERS = {"ats": _reduce_ats, "evit": _reduce_evit, "tome": _reduce_tome}


class _ATSVisionTransformer:
    """Methods that replace ``VisionTransformer``'s while ATS is applied."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask and is_causal are not supported while ATS is applied")
        config: ATSConfig = getattr(self, _CONFIG)
        reduce = _REDUCERS[config.reducer]
        P = self.num_prefix_tokens
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        B, N, _ = x.shape
        n = N - P
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()

        def run(fn, *args):
            return checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args)

        layout = Layout.dense(B, N, x.device, packed=config.mode == "packed")
        tokens = Tokens(x.flatten(0, 1), layout, torch.arange(n, device=x.device).expand(B, n))
        counts, positions = [layout.counts()], []
        budgets = dict(zip(config.blocks, config.num_tokens))
        for i, blk in enumerate(self.blocks):
            if i in budgets:
                tokens = run(reduce, blk, tokens, P, budgets[i], n, config)
                positions.append(tokens.positions)
            else:
                tokens = run(dense_block, blk, tokens)
            counts.append(tokens.layout.counts())

        token_counts = torch.stack(counts, dim=1)
        setattr(self, _VALID, tokens.layout.valid)
        setattr(self, _SIZE, tokens.size)
        setattr(self, _LAST, ATSStats(
            blocks=config.blocks,
            num_patches=n,
            num_kept=token_counts[:, [i + 1 for i in config.blocks]] - P,
            positions=tuple(positions),
            tokens=token_counts,
            gmacs=config.cost.macs(n, token_counts, config.blocks, config.reducer, P,
                                   get_scorer(config.scorer).query_rows) / 1e9,
            dense_gmacs=config.cost.dense_macs(n, P) / 1e9,
        ))
        return self.norm(tokens.padded())

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        valid, size = getattr(self, _VALID), getattr(self, _SIZE)
        weight = size if size is not None else valid  # merged tokens weigh as many patches as they hold
        if weight is None or pool_type in ("", "token") or weight.shape != x.shape[:2]:
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        x, weight = x[:, start:], weight[:, start:, None].to(x.dtype)
        keep = weight > 0
        mean = (x * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
        if pool_type == "avg":
            return mean
        peak = x.masked_fill(~keep, float("-inf")).amax(dim=1)
        return peak if pool_type == "max" else 0.5 * (peak + mean)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("forward_intermediates is not supported while ATS is applied; "
                                  "call ats_vit.remove(model) first")


_CLASSES: Dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"ATS{cls.__name__}", (_ATSVisionTransformer, cls), {})
    return _CLASSES[cls]
