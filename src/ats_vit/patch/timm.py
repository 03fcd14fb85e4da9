"""Apply Adaptive Token Sampling to timm ``VisionTransformer`` models, and undo it.

The model's class is swapped for a subclass whose ``forward_features`` runs the blocks on a
:class:`~ats_vit.block.Tokens` batch; parameters, buffers and state-dict keys are untouched,
and :func:`remove` swaps the original class back.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..flops import ViTCost
from .common import LAST, check_unpatched, checked_config, config_of, install, patched_class, run_blocks

_VALID = "_ats_valid"
_SIZE = "_ats_size"
_POOLS = ("", "token", "avg", "max", "avgmax")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or a subclass) or a transformers ViT, DeiT "
                        f"or CvT model, got {type(model).__name__}")
    check_unpatched(model)
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


def placement(model: nn.Module) -> Tuple[int, Tuple[int, ...]]:
    """Blocks ATS can go in, and the default ones: 3 to the last, the paper's DeiT-S placement."""
    depth = len(model.blocks)
    return depth, tuple(range(min(3, depth), depth))


def apply(model: nn.Module, blocks, num_tokens, sampler: str, mode: str, scorer: str, reducer: str) -> nn.Module:
    """:func:`ats_vit.apply` for a timm ``VisionTransformer`` (any subclass built on its standard
    blocks)."""
    _check_model(model)
    config = checked_config(placement(model), blocks, num_tokens, sampler, mode, scorer, reducer)
    install(model, model, patched_class(type(model), _ATSVisionTransformer), config, ViTCost.of(model))
    setattr(model, _VALID, None)
    setattr(model, _SIZE, None)
    return model


class _ATSVisionTransformer:
    """Methods that replace ``VisionTransformer``'s while ATS is applied."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask and is_causal are not supported while ATS is applied")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        tokens, stats = run_blocks(self.blocks, x, self.num_prefix_tokens, config_of(self), ckpt)
        setattr(self, _VALID, tokens.layout.valid)
        setattr(self, _SIZE, tokens.size)
        setattr(self, LAST, stats)
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
