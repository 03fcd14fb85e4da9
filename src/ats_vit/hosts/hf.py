"""The transformers host for ViT and DeiT (with or without the distillation head), and the class
table that tells every supported transformers model apart (CvT runs in :mod:`.hf_cvt`).

Needs the ``ats-vit[hf]`` extra (transformers 5.10 or later, whose ViT and DeiT layers hold
``q_proj``/``k_proj``/``v_proj``/``o_proj``). The model's heads, losses and outputs stay
transformers' own; only the backbone's class is swapped: its forward runs each layer, as a
:class:`~ats_vit.core.parts.BlockParts` record of the layer's own modules, through the same ATS,
EViT and ToMe kernels as timm's. ``last_hidden_state`` is (B, P + K'max, C): each image's kept
tokens, then padding rows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.macs import BlockCost, ViTCost, linear_macs
from ..core.parts import AttentionParts, BlockParts
from ..reducers import REDUCERS, TRAINED
from .patch import ATTRIBUTE, Patch, PatchConfig, check_unpatched, checked_config, install, patch_of, run_blocks

REQUIREMENT = "transformers>=5.10,<6 (pip install 'ats-vit[hf]')"


def _classes() -> dict:
    """Supported model class -> (backbone attribute or None, kind)."""
    from transformers import (CvtForImageClassification, CvtModel, DeiTForImageClassification,
                              DeiTForImageClassificationWithTeacher, DeiTModel, ViTForImageClassification,
                              ViTModel)
    return {ViTModel: (None, "vit"), ViTForImageClassification: ("vit", "vit"),
            DeiTModel: (None, "vit"), DeiTForImageClassification: ("deit", "vit"),
            DeiTForImageClassificationWithTeacher: ("deit", "vit"),
            CvtModel: (None, "cvt"), CvtForImageClassification: ("cvt", "cvt")}


def backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The model's ``ViTModel`` / ``DeiTModel`` / ``CvtModel`` and its kind ("vit" or "cvt");
    a TypeError names the supported classes for any other model."""
    classes = _classes()
    cls = patch_of(model).original_class if hasattr(model, ATTRIBUTE) else type(model)  # a patched bare backbone
    if cls not in classes:
        names = ", ".join(sorted(c.__name__ for c in classes))
        raise TypeError(f"transformers model {cls.__name__} is not supported; supported: {names}")
    attribute, kind = classes[cls]
    return (model if attribute is None else getattr(model, attribute)), kind


def refuse(**arguments) -> None:
    """Refuse forward arguments a patched model does not serve (None and False are fine)."""
    for name, value in arguments.items():
        if value is not None and value is not False:
            raise ValueError(f"{name} is not supported while ATS is applied; call ats_vit.remove(model) first")


def target(model: nn.Module) -> nn.Module:
    """The module a patch swaps: the ViT / DeiT backbone."""
    return backbone(model)[0]


def _check_layers(layers) -> None:
    for i, layer in enumerate(layers):
        attn = getattr(layer, "attention", None)
        parts = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(mlp, "fc1") or \
                not isinstance(getattr(layer, "layernorm_before", None), nn.LayerNorm):
            raise TypeError(f"layer {i} ({type(layer).__name__}) does not have the layout ATS supports; "
                            f"ats-vit needs {REQUIREMENT}")


def placement(model: nn.Module) -> Tuple[int, Tuple[int, ...]]:
    """Layers ATS can go in, and the default ones: 3 to the last (as for DeiT-S)."""
    depth = len(target(model).layers)
    return depth, tuple(range(min(3, depth), depth))


def validate(model: nn.Module, blocks, num_tokens, sampler: str, mode: str, scorer: str,
             reducer: str) -> PatchConfig:
    """The config :func:`ats_vit.apply` would install (``blocks`` index the backbone's layers);
    raises what it would raise."""
    backbone_ = target(model)
    check_unpatched(backbone_)
    _check_layers(backbone_.layers)
    return checked_config(placement(model), blocks, num_tokens, sampler, mode, scorer, reducer,
                          tuple(r for r in REDUCERS if r not in TRAINED))


def layer_parts(layer: nn.Module) -> BlockParts:
    """The record of a ``ViTLayer`` / ``DeiTLayer``'s parts: q/k/v run as one projection, the
    hidden dropout after the attention output and after the MLP, no layer scale or drop path."""
    attn = layer.attention
    identity = nn.Identity()
    return BlockParts(
        attn=AttentionParts(owner=attn, qkv=(attn.q_proj, attn.k_proj, attn.v_proj),
                            num_heads=attn.num_attention_heads, head_dim=attn.head_dim, scale=attn.scaling,
                            dropout=attn.attention_dropout, proj=attn.o_proj, proj_drop=layer.dropout,
                            q_norm=identity, k_norm=identity, norm=identity),
        norm1=layer.layernorm_before, norm2=layer.layernorm_after, mlp=nn.Sequential(layer.mlp, layer.dropout),
        ls1=identity, ls2=identity, drop_path1=identity, drop_path2=identity)


def cost_model(model: nn.Module) -> ViTCost:
    """MACs per image from the tokens each layer saw; heads are every linear layer outside the
    backbone, and the backbone's pooler."""
    backbone_ = target(model)
    pooler = getattr(backbone_, "pooler", None)
    head = linear_macs(model) - linear_macs(backbone_) + linear_macs(pooler)
    return ViTCost(per_patch=backbone_.embeddings.patch_embeddings.projection.weight.numel(), head=head,
                   blocks=[BlockCost.of(layer_parts(layer)) for layer in backbone_.layers])


def _num_prefix(backbone_: nn.Module) -> int:
    return 2 if getattr(backbone_.embeddings, "distillation_token", None) is not None else 1


def geometry(model: nn.Module, height: int, width: int) -> tuple[int, int, ViTCost]:
    """(patch tokens, prefix tokens, cost model) of the model on a ``height`` x ``width`` input."""
    backbone_ = target(model)
    patch = backbone_.embeddings.patch_embeddings.projection.stride
    return (height // patch[0]) * (width // patch[1]), _num_prefix(backbone_), cost_model(model)


def install_patch(model: nn.Module, config: PatchConfig) -> None:
    backbone_ = target(model)
    parts = tuple(layer_parts(layer) for layer in backbone_.layers)
    install(backbone_, _ATSViTModel, Patch(config, parts, cost_model(model), type(backbone_)))


class _ATSViTModel:
    """Methods that replace ``ViTModel``'s / ``DeiTModel``'s while ATS is applied."""

    def forward(self, pixel_values: Tensor = None, bool_masked_pos: Optional[Tensor] = None,
                interpolate_pos_encoding: Optional[bool] = None, attention_mask: Optional[Tensor] = None,
                output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        refuse(bool_masked_pos=bool_masked_pos, attention_mask=attention_mask,
               output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        weight = self.embeddings.patch_embeddings.projection.weight
        x = self.embeddings(pixel_values.to(weight.dtype), interpolate_pos_encoding=bool(interpolate_pos_encoding))
        ckpt = torch.is_grad_enabled() and any(getattr(layer, "gradient_checkpointing", False) for layer in self.layers)
        patch = patch_of(self)
        sequence = self.layernorm(run_blocks(patch.parts, x, _num_prefix(self), patch, ckpt).padded())
        pooled = self.pooler(sequence) if self.pooler is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=pooled)


def vit_from_timm(model: nn.Module):
    """A transformers ``ViTForImageClassification`` with the weights of the timm ViT ``model``
    (a plain ViT/DeiT: class token, token pooling, no LayerScale, registers, pre-norm or fc-norm;
    anything else is refused with a TypeError naming it). Its logits equal timm's within float
    tolerance; :func:`save_vit_from_timm` also writes the image processor of timm's transform."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    from transformers import ViTConfig, ViTForImageClassification

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vit_from_timm takes a timm VisionTransformer, got {type(model).__name__}")
    blk = model.blocks[0]
    unsupported = {
        "no class token": not model.has_class_token, "registers": model.num_reg_tokens > 0,
        f"global_pool={model.global_pool!r}": model.global_pool != "token",
        "no_embed_class": model.no_embed_class, "pre-norm": not isinstance(model.norm_pre, nn.Identity),
        "fc_norm": not isinstance(model.fc_norm, nn.Identity),
        "LayerScale": not isinstance(blk.ls1, nn.Identity),
        "other blocks": any(type(b) is not Block or type(b.attn) is not Attention or type(b.mlp) is not Mlp
                            or not isinstance(b.attn.q_norm, nn.Identity) or not isinstance(b.attn.norm, nn.Identity)
                            for b in model.blocks),
        "a patch embedding with a norm": not isinstance(model.patch_embed.norm, nn.Identity),
    }
    refused = [name for name, found in unsupported.items() if found]
    if refused:
        raise TypeError(f"vit_from_timm: transformers' ViT has no {', '.join(refused)}")
    heads, dim = blk.attn.num_heads, model.embed_dim
    config = ViTConfig(hidden_size=dim, num_hidden_layers=len(model.blocks), num_attention_heads=heads,
                       intermediate_size=blk.mlp.fc1.out_features, hidden_act="gelu", layer_norm_eps=blk.norm1.eps,
                       image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                       num_channels=model.patch_embed.proj.in_channels, qkv_bias=blk.attn.qkv.bias is not None,
                       num_labels=model.num_classes, **_imagenet_labels(model.num_classes))
    converted = ViTForImageClassification(config).eval()
    state = {"vit.embeddings.cls_token": model.cls_token, "vit.embeddings.position_embeddings": model.pos_embed,
             "vit.embeddings.patch_embeddings.projection.weight": model.patch_embed.proj.weight,
             "vit.embeddings.patch_embeddings.projection.bias": model.patch_embed.proj.bias,
             "vit.layernorm.weight": model.norm.weight, "vit.layernorm.bias": model.norm.bias,
             "classifier.weight": model.head.weight, "classifier.bias": model.head.bias}
    for i, b in enumerate(model.blocks):
        at = f"vit.layers.{i}."
        for part, w in zip(("q_proj", "k_proj", "v_proj"), b.attn.qkv.weight.chunk(3)):
            state[at + f"attention.{part}.weight"] = w
        if b.attn.qkv.bias is not None:
            for part, w in zip(("q_proj", "k_proj", "v_proj"), b.attn.qkv.bias.chunk(3)):
                state[at + f"attention.{part}.bias"] = w
        pairs = {"attention.o_proj": b.attn.proj, "layernorm_before": b.norm1, "layernorm_after": b.norm2,
                 "mlp.fc1": b.mlp.fc1, "mlp.fc2": b.mlp.fc2}
        for name, module in pairs.items():
            state[at + name + ".weight"] = module.weight
            state[at + name + ".bias"] = module.bias
    converted.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return converted


def _imagenet_labels(num_classes: int) -> dict:
    if num_classes != 1000:
        return {}
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    names = {i: info.index_to_description(i) for i in range(1000)}
    return {"id2label": names, "label2id": {v: k for k, v in names.items()}}


def save_vit_from_timm(model: nn.Module, folder) -> None:
    """:func:`vit_from_timm` saved to ``folder`` with an image processor that does what timm's
    eval transform for ``model`` does (resize the short side to size / crop_pct, bicubic, centre
    crop, its mean and std), so ``ats-vit eval --model hf:FOLDER`` sees the same pixels."""
    from timm.data import resolve_data_config
    from transformers import ConvNextImageProcessor

    config = resolve_data_config({}, model=model)
    if config["interpolation"] != "bicubic" or config["crop_mode"] != "center":
        raise TypeError(f"save_vit_from_timm: the processor does bicubic centre crops, the model's transform is "
                        f"{config['interpolation']} {config['crop_mode']}")
    vit_from_timm(model).save_pretrained(folder)
    # ConvNeXt's processor resizes the short side to shortest_edge / crop_pct, then centre-crops: timm's eval resize
    ConvNextImageProcessor(size={"shortest_edge": model.patch_embed.img_size[-1]}, crop_pct=config["crop_pct"],
                           resample=3, image_mean=list(config["mean"]), image_std=list(config["std"])
                           ).save_pretrained(folder)
