"""``apply`` for every supported host library; the host is told apart by the model's class, and
transformers is imported only for a transformers model."""
from __future__ import annotations

from torch import nn

from .common import is_patched, last_stats, remove

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


def apply(model: nn.Module, *args, **kwargs) -> nn.Module:
    """Put ATS into a timm ``VisionTransformer`` (:func:`ats_vit.patch.timm.apply`) or a Hugging
    Face transformers ViT, DeiT or CvT model (:func:`ats_vit.patch.hf.apply`, needs the
    ``ats-vit[hf]`` extra), in place; the same arguments for both."""
    return _host(model).apply(model, *args, **kwargs)
