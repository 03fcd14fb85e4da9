"""``apply`` for every supported host library; the host is told apart by the model's class, and
transformers is imported only for a transformers model."""
from __future__ import annotations

from torch import nn

from .common import is_patched, last_stats, remove

__all__ = ["apply", "remove", "is_patched", "last_stats"]


def apply(model: nn.Module, *args, **kwargs) -> nn.Module:
    """Put ATS into a timm ``VisionTransformer`` (:func:`ats_vit.patch.timm.apply`) or a Hugging
    Face transformers ViT, DeiT or CvT model (:func:`ats_vit.patch.hf.apply`, needs the
    ``ats-vit[hf]`` extra), in place; the same arguments for both."""
    if type(model).__module__.startswith("transformers."):
        from . import hf
        return hf.apply(model, *args, **kwargs)
    from . import timm
    return timm.apply(model, *args, **kwargs)
