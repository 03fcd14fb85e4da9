"""``apply`` for every supported host library; the host is told apart by the model's class, and
transformers is imported only for a transformers model."""
from __future__ import annotations

from typing import Sequence, Union

from torch import nn

from .common import TokenBudget, is_patched, last_stats, remove

__all__ = ["apply", "remove", "is_patched", "last_stats", "default_blocks", "is_transformers_model"]


def is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _host(model: nn.Module):
    if is_transformers_model(model):
        from . import hf
        return hf
    from . import timm
    return timm


def default_blocks(model: nn.Module) -> tuple:
    """The blocks :func:`apply` patches when ``blocks`` is None (timm, ViT, DeiT: 3 to the last;
    CvT: layers 1 to 9 of its last stage)."""
    return _host(model).placement(model)[1]


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
            for which ``sampler`` and ``scorer`` do not apply and ``None`` means no reduction.
    """
    return _host(model).apply(model, blocks, num_tokens, sampler, mode, scorer, reducer)
