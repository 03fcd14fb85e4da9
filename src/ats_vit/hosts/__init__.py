"""Patching a host library's model: :func:`apply` and its inverse for every supported host.

The host is told apart by the model's class (timm, or transformers ViT/DeiT and CvT), and
transformers is imported only for a transformers model. Each host module offers the same
functions: ``target`` (the module a patch swaps), ``placement``, ``validate``, ``install_patch``,
``cost_model`` and ``geometry``.
"""
from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Optional, Sequence, Tuple, Union

from torch import nn

from ..core.budget import NumTokens
from ..core.stats import ATSStats
from .patch import ATTRIBUTE, Patch, PatchConfig, patch_of, reducer_blocks, uninstall

__all__ = ["apply", "validate", "remove", "is_patched", "last_stats", "default_blocks", "training_outputs", "cost_model",
           "dense_gmacs", "num_patches", "is_transformers_model", "PatchConfig", "forward_with_stats"]


def is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _host(model: nn.Module) -> ModuleType:
    if is_transformers_model(model):
        from . import hf
        if hf.backbone(model)[1] == "cvt":
            from . import hf_cvt
            return hf_cvt
        return hf
    from . import timm
    return timm


def _patch(model: nn.Module) -> Optional[Patch]:
    try:
        target = _host(model).target(model)
    except TypeError:  # not a model any host serves
        return None
    return patch_of(target) if hasattr(target, ATTRIBUTE) else None


def default_blocks(model: nn.Module, reducer: str = "ats") -> tuple:
    """The blocks :func:`apply` patches when ``blocks`` is None (timm, ViT, DeiT: 3 to the last;
    CvT: layers 1 to 9 of its last stage; DynamicViT: 3, 6 and 9 of 12 blocks)."""
    return reducer_blocks(_host(model).placement(model), reducer)


def training_outputs(model: nn.Module) -> tuple:
    """What the calling thread's last training forward of a model with a trained reducer
    (DynamicViT) left for its loss: each reducing block's keep mask (B, N) and the final normed
    tokens (B, N, C)."""
    patch = _patch(model)
    if patch is None or not patch.last.keep_masks:
        raise ValueError("no masked training forward has run in this thread (DynamicViT applied, model.train())")
    return patch.last.keep_masks, patch.last.features


def apply(
        model: nn.Module,
        blocks: Union[None, int, Sequence[int]] = None,
        num_tokens: Union[NumTokens, Sequence[NumTokens]] = None,
        sampler: str = "inverse_transform",
        mode: str = "packed",
        scorer: str = "cls_value",
        reducer: str = "ats",
) -> nn.Module:
    """Put ATS (or, for comparison, another token reducer) into ``model`` in place and return it.

    Args:
        model: a timm ``VisionTransformer`` (any subclass built on its standard blocks), or a
            transformers ViT, DeiT or CvT model (needs the ``ats-vit[hf]`` extra; transformers is
            imported only for such a model).
        blocks: ATS block indices; None means the model's default (:func:`default_blocks`: every
            block from 3 to the last, the paper's DeiT-S placement; CvT: its last stage's layers
            1 to 9); an empty list patches no block (tokens and GMACs are still recorded).
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
            for which ``sampler`` and ``scorer`` do not apply and ``None`` means no reduction; and
            ``"dynamicvit"`` (timm models; DynamicViT's keep predictors before its blocks, by
            default 3, 6 and 9 of 12, each keeping ``num_tokens`` of the tokens entering it; the
            predictors are added to the model when it has none, trained by fine-tuning (see
            :func:`ats_vit.reducers.dynamicvit.dynamicvit_loss`) and kept by :func:`remove`).
    """
    _host(model).install_patch(model, validate(model, blocks, num_tokens, sampler, mode, scorer, reducer))
    return model


def validate(model: nn.Module, *args, **kwargs) -> PatchConfig:
    """Check :func:`apply`'s arguments (the same, with the same defaults) against ``model``
    without touching it: the config apply would install, or the ValueError / TypeError apply
    would raise."""
    bound = inspect.signature(apply).bind(model, *args, **kwargs)
    bound.apply_defaults()
    config = _host(model).validate(*bound.arguments.values())
    if any(p.is_meta for p in model.parameters()):  # the selection's token counts depend on the values
        raise ValueError("model has parameters on the meta device; ATS picks tokens from computed scores, so "
                         "load real weights first (model.to_empty(device=...), then load_state_dict)")
    return config


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model computes exactly what it computed before."""
    if _patch(model) is None:
        raise ValueError("model is not patched with ATS (ats_vit.apply was never called on it)")
    uninstall(_host(model).target(model))
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ATS is applied to ``model``."""
    return _patch(model) is not None


def last_stats(model: nn.Module) -> ATSStats:
    """Tokens kept, their positions and GMACs per image in the model's last forward in the
    calling thread (each thread sees its own forwards; see :func:`forward_with_stats`)."""
    patch = _patch(model)
    if patch is None:
        raise ValueError("model is not patched with ATS; call ats_vit.apply(model) first")
    stats = patch.last_stats()
    if stats is None:
        raise ValueError("no forward has run since ats_vit.apply; run the model first")
    return stats


def forward_with_stats(model: nn.Module, *args, **kwargs) -> Tuple[Any, ATSStats]:
    """``model(*args, **kwargs)`` and that forward's :class:`ATSStats`, as one call."""
    output = model(*args, **kwargs)
    return output, last_stats(model)


def cost_model(model: nn.Module):
    """The model's MAC cost model (see :mod:`ats_vit.core.macs`): ``ViTCost`` for timm and
    transformers ViT/DeiT, ``CvtCost`` (bound to an input size by ``.at``) for CvT."""
    return _host(model).cost_model(model)


def num_patches(model: nn.Module, height: int, width: int) -> int:
    """Patch tokens ATS can select from on a ``height`` x ``width`` input (CvT: its last stage's)."""
    return _host(model).geometry(model, height, width)[0]


def dense_gmacs(model: nn.Module, height: int, width: int) -> float:
    """GMACs of one ``height`` x ``width`` image through the unpatched ``model``."""
    patches, prefix, cost = _host(model).geometry(model, height, width)
    return cost.dense_macs(patches, prefix) / 1e9
