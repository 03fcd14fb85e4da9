"""Apply Adaptive Token Sampling to Hugging Face transformers ViT, DeiT and CvT models.

Needs the ``ats-vit[hf]`` extra (transformers 5.10 or later, whose ViT and DeiT layers hold
``q_proj``/``k_proj``/``v_proj``/``o_proj``). The model's heads, losses and outputs stay
transformers' own; only the backbone's class is swapped:

- ViT / DeiT: the ``ViTModel`` / ``DeiTModel`` forward runs each layer through a view that gives
  it timm's ``Block`` interface (:class:`_LayerView`), so the same ATS, EViT and ToMe blocks serve
  it. ``last_hidden_state`` is (B, P + K'max, C): each image's kept tokens, then padding rows.
- CvT: the ``CvtEncoder`` forward runs the stage with the class token (the last) through
  :func:`ats_vit.cvt_block.cvt_block`. Its ``last_hidden_state`` grid holds the kept tokens at
  their positions and zeros where tokens were dropped.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..block import block_forward
from ..cvt_block import cvt_block, grid_of_tokens
from ..flops import BlockCost, CvtCost, ViTCost, linear_macs
from ..registry import get_sampler
from .common import LAST, budget, check_unpatched, checked_config, config_of, install, patched_class, run_blocks

REQUIREMENT = "transformers>=5.10,<6 (pip install 'ats-vit[hf]')"
_VIEWS = "_ats_views"


class _StackedLinear(nn.Module):
    """Query, key and value projections run as timm's one fused ``qkv`` layer (B, N, 3 * D)."""

    def __init__(self, q: nn.Linear, k: nn.Linear, v: nn.Linear):
        super().__init__()
        self.q, self.k, self.v = q, k, v
        self.in_features = q.in_features

    def forward(self, x: Tensor) -> Tensor:
        parts = (self.q, self.k, self.v)
        bias = None if self.q.bias is None else torch.cat([p.bias for p in parts])
        return F.linear(x, torch.cat([p.weight for p in parts]), bias)


class _AttentionView:
    """timm ``Attention``'s interface over a transformers ViT/DeiT attention module."""
    fused_attn = True
    gate = None

    def __init__(self, attention: nn.Module):
        self.module = attention
        self.num_heads = attention.num_attention_heads
        self.head_dim = attention.head_dim
        self.scale = attention.scaling
        self.qkv = _StackedLinear(attention.q_proj, attention.k_proj, attention.v_proj)
        self.q_norm = self.k_norm = self.norm = nn.Identity()
        self.attn_drop = nn.Dropout(attention.attention_dropout)
        self.proj = attention.o_proj

    @property
    def training(self) -> bool:
        return self.module.training


class _LayerView:
    """timm ``Block``'s interface over a transformers ``ViTLayer`` / ``DeiTLayer``; it holds the
    layer's own modules, so training, device moves and loaded weights all reach it."""

    def __init__(self, layer: nn.Module):
        self.norm1, self.norm2 = layer.layernorm_before, layer.layernorm_after
        self.attn = _AttentionView(layer.attention)
        self.attn.proj_drop = layer.dropout  # hidden dropout after the attention output
        self.mlp = nn.Sequential(layer.mlp, layer.dropout)
        self.ls1 = self.ls2 = self.drop_path1 = self.drop_path2 = nn.Identity()

    def __call__(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        return block_forward(self, x, attn_mask)


def _classes() -> dict:
    """Supported model class -> (backbone attribute or None, kind)."""
    from transformers import (CvtForImageClassification, CvtModel, DeiTForImageClassification,
                              DeiTForImageClassificationWithTeacher, DeiTModel, ViTForImageClassification,
                              ViTModel)
    return {ViTModel: (None, "vit"), ViTForImageClassification: ("vit", "vit"),
            DeiTModel: (None, "vit"), DeiTForImageClassification: ("deit", "vit"),
            DeiTForImageClassificationWithTeacher: ("deit", "vit"),
            CvtModel: (None, "cvt"), CvtForImageClassification: ("cvt", "cvt")}


def _check_vit_layers(backbone: nn.Module) -> None:
    for i, layer in enumerate(backbone.layers):
        attn = getattr(layer, "attention", None)
        parts = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(mlp, "fc1") or \
                not isinstance(getattr(layer, "layernorm_before", None), nn.LayerNorm):
            raise TypeError(f"layer {i} ({type(layer).__name__}) does not have the layout ATS supports; "
                            f"ats-vit needs {REQUIREMENT}")


def _check_cvt_stage(stage: nn.Module) -> None:
    for i, layer in enumerate(stage.layers):
        sa = layer.attention.attention
        convs = [getattr(getattr(sa, f"convolution_projection_{n}"), "convolution_projection", None)
                 for n in ("query", "key", "value")]
        if not all(isinstance(getattr(c, "convolution", None), nn.Conv2d) for c in convs):
            raise ValueError(f"CvT stage-3 layer {i} does not use depthwise-convolution projections "
                             "(qkv_projection_method 'dw_bn'); ATS supports only those")
        if convs[0].convolution.stride != (1, 1):
            raise ValueError(f"CvT stage-3 layer {i} has query stride {convs[0].convolution.stride}; "
                             "ATS needs stride 1 (one query per token)")


def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    classes = _classes()
    if type(model) not in classes:
        names = ", ".join(sorted(c.__name__ for c in classes))
        raise TypeError(f"transformers model {type(model).__name__} is not supported; supported: {names}")
    attribute, kind = classes[type(model)]
    return (model if attribute is None else getattr(model, attribute)), kind


def placement(model: nn.Module) -> Tuple[int, Tuple[int, ...]]:
    """Layers ATS can go in, and the default ones: ViT/DeiT layers 3 to the last (as for DeiT-S);
    CvT: the last stage's layers 1 to 9 (the paper's placement, 0-indexed within the stage)."""
    backbone, kind = _backbone(model)
    if kind == "vit":
        depth = len(backbone.layers)
        return depth, tuple(range(min(3, depth), depth))
    depth = len(backbone.encoder.stages[-1].layers)
    return depth, tuple(range(min(1, depth), min(10, depth)))


def apply(model: nn.Module, blocks, num_tokens, sampler: str, mode: str, scorer: str, reducer: str) -> nn.Module:
    """:func:`ats_vit.apply` for transformers models.

    ViT / DeiT: ``blocks`` index ``model.vit.layers`` (default 3 to the last, as for DeiT-S).
    CvT: ``blocks`` index the layers of the last stage, the only one with a class token (default
    1 to 9, the paper's placement; fewer when the stage is shorter); only ``reducer="ats"`` with
    the ``"cls_value"`` scorer.
    """
    backbone, kind = _backbone(model)
    check_unpatched(model)
    if kind == "vit":
        return _apply_vit(model, backbone, blocks, num_tokens, sampler, mode, scorer, reducer)
    return _apply_cvt(model, backbone, blocks, num_tokens, sampler, mode, scorer, reducer)


def _apply_vit(model, backbone, blocks, num_tokens, sampler, mode, scorer, reducer) -> nn.Module:
    _check_vit_layers(backbone)
    config = checked_config(placement(model), blocks, num_tokens, sampler, mode, scorer, reducer)
    views = tuple(_LayerView(layer) for layer in backbone.layers)
    pooler = getattr(backbone, "pooler", None)
    # Heads: every linear layer outside the backbone, and the backbone's pooler.
    head = linear_macs(model) - linear_macs(backbone) + linear_macs(pooler)
    cost = ViTCost(per_patch=backbone.embeddings.patch_embeddings.projection.weight.numel(), head=head,
                   blocks=[BlockCost.of(v) for v in views])
    install(model, backbone, patched_class(type(backbone), _ATSViTModel), config, cost)
    setattr(backbone, _VIEWS, views)
    return model


def _apply_cvt(model, backbone, blocks, num_tokens, sampler, mode, scorer, reducer) -> nn.Module:
    encoder = backbone.encoder
    stage = encoder.stages[-1]
    if not backbone.config.cls_token[-1] or any(backbone.config.cls_token[:-1]):
        raise ValueError("CvT needs a class token in its last stage, and only there, for ATS")
    _check_cvt_stage(stage)
    config = checked_config(placement(model), blocks, num_tokens, sampler, mode, scorer, reducer)
    if (reducer, scorer) != ("ats", "cls_value"):
        raise ValueError(f"CvT supports reducer 'ats' with scorer 'cls_value' only, got {reducer!r} "
                         f"with {scorer!r}: its keys are not its tokens")
    head = linear_macs(model) - linear_macs(backbone)
    install(model, encoder, patched_class(type(encoder), _ATSCvtEncoder), config, CvtCost.of(encoder, head))
    return model


def _refuse(**arguments) -> None:
    for name, value in arguments.items():
        if value is not None and value is not False:
            raise ValueError(f"{name} is not supported while ATS is applied; call ats_vit.remove(model) first")


class _ATSViTModel:
    """Methods that replace ``ViTModel``'s / ``DeiTModel``'s while ATS is applied."""

    def forward(self, pixel_values: Tensor = None, bool_masked_pos: Optional[Tensor] = None,
                interpolate_pos_encoding: Optional[bool] = None, attention_mask: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        _refuse(bool_masked_pos=bool_masked_pos, attention_mask=attention_mask,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        weight = self.embeddings.patch_embeddings.projection.weight
        x = self.embeddings(pixel_values.to(weight.dtype), interpolate_pos_encoding=bool(interpolate_pos_encoding))
        prefix = 2 if getattr(self.embeddings, "distillation_token", None) is not None else 1
        ckpt = torch.is_grad_enabled() and any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers)
        tokens, stats = run_blocks(getattr(self, _VIEWS), x, prefix, config_of(self), ckpt)
        setattr(self, LAST, stats)
        sequence = self.layernorm(tokens.padded())
        pooled = self.pooler(sequence) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)


class _ATSCvtEncoder:
    """Methods that replace ``CvtEncoder``'s while ATS is applied: its last stage (the one with
    the class token) runs through :func:`~ats_vit.cvt_block.cvt_block`."""

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False, return_dict: bool = True):
        from transformers.models.cvt.modeling_cvt import BaseModelOutputWithCLSToken

        _refuse(output_hidden_states=output_hidden_states)
        height, width = pixel_values.shape[-2:]
        hidden = pixel_values
        for stage in self.stages[:-1]:
            hidden, _ = stage(hidden)
        stage = self.stages[-1]
        grid = stage.embedding(hidden)
        B, C, H, W = grid.shape
        x = torch.cat([stage.cls_token.expand(B, -1, -1), grid.flatten(2).transpose(1, 2)], dim=1)
        shape = (H, W)

        def reduce(layer, tokens, num_prefix, value, num_patches, config):
            k = budget(value, tokens, num_patches, num_prefix)
            return cvt_block(layer, tokens, shape, (k, get_sampler(config.sampler)))

        config = config_of(self)
        tokens, stats = run_blocks(stage.layers, x, 1, config, reduce=reduce,
                                   dense=lambda layer, tokens: cvt_block(layer, tokens, shape),
                                   cost=config.cost.at(height, width))
        setattr(self, LAST, stats)
        padded = tokens.padded()
        cls = padded[:, :1]
        hidden = grid_of_tokens(padded[:, 1:], tokens.positions, shape)
        if not return_dict:
            return hidden, cls
        return BaseModelOutputWithCLSToken(last_hidden_state=hidden, cls_token_value=cls)
