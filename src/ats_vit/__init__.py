"""ats-vit: Adaptive Token Sampling (Fayyaz et al., ECCV 2022) for pretrained Vision Transformers.

Layers, imports running one way: :mod:`ats_vit.jobs` (the command line) -> :mod:`ats_vit.hosts`
(patching timm and transformers models) -> :mod:`ats_vit.reducers` (ATS, EViT, ToMe by name) ->
:mod:`ats_vit.core` (scoring, sampling, the token batch, block kernels, MAC counting).
"""
from . import zoo  # noqa: F401  (registers the bundled model with timm)
from .core.macs import BlockCost, ViTCost
from .core.sampling import (get_sampler, inverse_transform_sampling, list_samplers, random_sampling,
                            register_sampler, topk_sampling)
from .core.scoring import get_scorer, list_scorers, token_scores
from .core.stats import ATSStats
from .hosts import apply, cost_model, dense_gmacs, forward_with_stats, is_patched, last_stats, remove, validate

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "is_patched", "last_stats", "forward_with_stats", "validate", "ATSStats",
    "token_scores", "inverse_transform_sampling", "topk_sampling", "random_sampling",
    "get_sampler", "list_samplers", "register_sampler", "get_scorer", "list_scorers",
    "BlockCost", "ViTCost", "cost_model", "dense_gmacs",
]
