"""ats-vit: Adaptive Token Sampling (Fayyaz et al., ECCV 2022) for pretrained Vision Transformers."""
from . import zoo  # noqa: F401  (registers the bundled model with timm)
from .flops import BlockCost, ViTCost
from .patch import apply, is_patched, last_stats, remove
from .registry import get_sampler, get_scorer, list_samplers, list_scorers, register_sampler
from .sampling import inverse_transform_sampling, random_sampling, token_scores, topk_sampling
from .stats import ATSStats

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "is_patched", "last_stats", "ATSStats",
    "token_scores", "inverse_transform_sampling", "topk_sampling", "random_sampling",
    "get_sampler", "list_samplers", "register_sampler", "get_scorer", "list_scorers",
    "BlockCost", "ViTCost",
]
