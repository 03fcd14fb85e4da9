"""The ``ats-vit ablate`` command: the paper's ablations and the rival reducers at matched GMACs,
through the ``eval`` job."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Sequence

import torch
from torch import nn

from ..hosts import default_blocks
from .eval import CompareOptions, run_eval
from .evaluation import DENSE, Method, budget_for, image_gmacs, refusal
from .options import OUT


def ablation_suite(model: nn.Module, images: torch.Tensor, batch_size: int,
                   reductions: Sequence[float] = (0.4, 0.5, 0.6),
                   progress: Callable[[str], None] = lambda s: None) -> List[Method]:
    """The paper's ablations and the rival reducers on ``model``: ATS's released configuration (K =
    all patches), then each variant at ``reductions`` of dense GMACs (budgets found on ``images``):
    ATS in its default blocks (3..last) against top-K and random selection, against the class
    attention without the value norm, the attention from all queries and random scores, against ATS
    in the first of them alone; and EViT and ToMe in the same blocks. ATS rows are compared with
    dense, the others with ATS at their budget."""
    late = default_blocks(model)
    span = f"{late[0]}-{late[-1]}"
    variants = [
        Method("", f"ATS {span}", late),
        Method("", f"top-K {span}", late, sampler="topk"),
        Method("", f"random selection {span}", late, sampler="random"),
        Method("", f"ATS {span}, no value norm", late, scorer="cls"),
        Method("", f"ATS {span}, all-query attention", late, scorer="all_queries"),
        Method("", f"ATS {span}, random scores", late, scorer="random"),
        Method("", f"ATS block {late[0]}", late[:1]),
        Method("", f"EViT {span}", late, reducer="evit"),
        Method("", f"ToMe {span}", late, reducer="tome"),
    ]
    refused = {v.family: refusal(model, v) for v in variants}
    for family, reason in refused.items():
        if reason:
            progress(f"skipping {family}: {reason}")
    variants = [v for v in variants if not refused[v.family]]
    dense = image_gmacs(model, images)
    methods = [DENSE, variants[0].with_tokens(None, f"{variants[0].family} released (K=all)")]
    for r in reductions:
        for v in variants:
            progress(f"finding the budget of {v.family} for {r:.0%} fewer GMACs")
            method = budget_for(model, v, images, (1 - r) * dense, batch_size, f"{v.family} -{r:.0%}")[0]
            # ATS is compared with dense; every other variant with ATS at the same budget
            methods.append(method if v is variants[0] else replace(method, reference=f"{variants[0].family} -{r:.0%}"))
    return methods


@dataclass
class AblateOptions(CompareOptions):
    out: str = OUT("runs/ablate")


def run_ablate(options: AblateOptions):
    """:func:`~ats_vit.jobs.eval.run_eval` on the ablation suite."""
    return run_eval(options, ablation_suite)


COMMAND = dict(
    name="ablate", options=AblateOptions, run=run_ablate,
    help="the paper's ablations and EViT/ToMe at matched GMACs, one table",
    description="ATS's released configuration, and every variant (ATS, top-K and random selection; no value norm, all-query attention and random "
                "scores; ATS in block 3 alone; EViT; ToMe) at each of --reductions of dense GMACs, budgets found "
                "on the calibration images.")
