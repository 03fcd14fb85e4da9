"""Token selection and scoring rules chosen by name (see :mod:`ats_vit.sampling` and
:mod:`ats_vit.scoring`)."""
from __future__ import annotations

from typing import Dict, TypeVar

from .sampling import Sampler, inverse_transform_sampling, random_sampling, topk_sampling
from .scoring import SCORERS, Scorer

T = TypeVar("T")

_SAMPLERS: Dict[str, Sampler] = {
    "inverse_transform": inverse_transform_sampling,
    "topk": topk_sampling,
    "random": random_sampling,
}


def register_sampler(name: str, sampler: Sampler) -> None:
    """Make ``sampler`` available to :func:`ats_vit.apply` as ``sampler=name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in _SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is already registered")
    if not callable(sampler):
        raise TypeError(f"sampler must be callable (scores, num_samples) -> index, got {type(sampler).__name__}")
    _SAMPLERS[name] = sampler


def list_samplers() -> list[str]:
    """Names accepted by ``sampler=``."""
    return sorted(_SAMPLERS)


def _lookup(table: Dict[str, T], argument: str, name: str) -> T:
    """``table[name]``; a ValueError naming ``argument`` lists the allowed names otherwise."""
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{argument} must be one of {sorted(table)}, got {name!r}")
    return table[name]


def get_sampler(name: str) -> Sampler:
    """The sampler registered as ``name``; a ValueError lists the allowed names otherwise."""
    return _lookup(_SAMPLERS, "sampler", name)


def list_scorers() -> list[str]:
    """Names accepted by ``scorer=``."""
    return sorted(SCORERS)


def get_scorer(name: str) -> Scorer:
    """The scoring rule registered as ``name``; a ValueError lists the allowed names otherwise."""
    return _lookup(SCORERS, "scorer", name)
