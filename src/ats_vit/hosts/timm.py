"""The timm host: ``VisionTransformer`` models (any subclass built on timm's standard blocks).

The model is its own patch target: its class is swapped for a subclass whose
``forward_features`` runs the blocks, as :class:`~ats_vit.core.parts.BlockParts` records, on a
:class:`~ats_vit.core.tokens.Tokens` batch; parameters, buffers and state-dict keys are
untouched, and :func:`ats_vit.remove` swaps the original class back.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..core.macs import BlockCost, ViTCost, linear_macs
from ..core.parts import AttentionParts, BlockParts
from ..reducers.dynamicvit import check_predictors, predictors_of
from .patch import POOL_WEIGHT, Patch, PatchConfig, check_unpatched, checked_config, install, patch_of, run_blocks

_POOLS = ("", "token", "avg", "max", "avgmax")


def target(model: nn.Module) -> nn.Module:
    """The module a patch swaps: the model itself."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a timm VisionTransformer (or a subclass) or a transformers ViT, DeiT "
                        f"or CvT model, got {type(model).__name__}")
    return model


def _check_model(model: nn.Module) -> None:
    check_unpatched(target(model))
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
    depth = len(target(model).blocks)
    return depth, tuple(range(min(3, depth), depth))


def validate(model: nn.Module, blocks, num_tokens, sampler: str, mode: str, scorer: str,
             reducer: str) -> PatchConfig:
    """The config :func:`ats_vit.apply` would install; raises what it would raise."""
    _check_model(model)
    config = checked_config(placement(model), blocks, num_tokens, sampler, mode, scorer, reducer)
    if config.reducer == "dynamicvit":
        check_predictors(model, config.blocks)
    return config


def block_parts(block: Block) -> BlockParts:
    """The record of a timm ``Block``'s parts."""
    attn = block.attn
    return BlockParts(
        attn=AttentionParts(owner=attn, qkv=(attn.qkv,), num_heads=attn.num_heads, head_dim=attn.head_dim,
                            scale=attn.scale, dropout=attn.attn_drop.p, proj=attn.proj, proj_drop=attn.proj_drop,
                            q_norm=attn.q_norm, k_norm=attn.k_norm, norm=attn.norm, gate=getattr(attn, "gate", None),
                            fused=attn.fused_attn),
        norm1=block.norm1, norm2=block.norm2, mlp=block.mlp, ls1=block.ls1, ls2=block.ls2,
        drop_path1=block.drop_path1, drop_path2=block.drop_path2)


def cost_model(model: nn.Module) -> ViTCost:
    """MACs per image of the model from the tokens each block saw (see :mod:`ats_vit.core.macs`)."""
    head = linear_macs(model.head) + linear_macs(getattr(model, "head_dist", None))
    return ViTCost(per_patch=model.patch_embed.proj.weight.numel(), head=head,
                   blocks=[BlockCost.of(block_parts(b)) for b in model.blocks])


def geometry(model: nn.Module, height: int, width: int) -> tuple[int, int, ViTCost]:
    """(patch tokens, prefix tokens, cost model) of the model on a ``height`` x ``width`` input."""
    embed = model.patch_embed
    grid = embed.dynamic_feat_size((height, width)) if model.dynamic_img_size else embed.grid_size
    return grid[0] * grid[1], model.num_prefix_tokens, cost_model(model)


def install_patch(model: nn.Module, config: PatchConfig) -> None:
    parts = tuple(block_parts(b) for b in model.blocks)
    learned = predictors_of(model, config.blocks, model.embed_dim) if config.reducer == "dynamicvit" else {}
    install(model, _ATSVisionTransformer, Patch(config, parts, cost_model(model), type(model), learned=learned))


class _ATSVisionTransformer:
    """Methods that replace ``VisionTransformer``'s while ATS is applied."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask and is_causal are not supported while ATS is applied")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
        patch = patch_of(self)
        tokens = run_blocks(patch.parts, x, self.num_prefix_tokens, patch, ckpt)
        x = self.norm(tokens.padded())
        patch.last.features = x if patch.last.keep_masks else None  # a masked training forward's, for its loss
        weight = tokens.pool_weight()
        if weight is not None:  # these features' own pooling weights go where they go (forward_head)
            setattr(x, POOL_WEIGHT, weight)
        return x

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        """timm's pooling, over each image's real tokens weighted as the forward that made ``x``
        left them (a tensor without those weights pools as timm does)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        weight = getattr(x, POOL_WEIGHT, None)
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
