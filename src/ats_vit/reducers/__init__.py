"""Token reducers by name: ATS (the core algorithm) and, for comparison, the rivals EViT, ToMe
and DynamicViT.

Every reducer runs one block on a token batch through the same step:
``step(block, tokens, num_prefix, num_tokens, num_patches, sampler, scorer, module) -> Tokens``,
where ``num_tokens`` is that block's budget (see :mod:`ats_vit.core.budget`) and ``num_patches``
the input's patch count; ``sampler`` and ``scorer`` name ATS's choices and the rivals ignore them;
``module`` is the reducer's own trained module for that block (DynamicViT's predictor), else None.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from ..core.block import ats_block
from ..core.budget import NumTokens, resolve_k, uniform_k
from ..core.parts import BlockParts
from ..core.sampling import get_sampler
from ..core.scoring import get_scorer
from ..core.tokens import Tokens
from .dynamicvit import dynamicvit_block
from .evit import evit_block
from .tome import tome_block

Step = Callable[[BlockParts, Tokens, int, NumTokens, int, str, str, Optional[nn.Module]], Tokens]


def ats_step(block: BlockParts, tokens: Tokens, num_prefix: int, num_tokens: NumTokens, num_patches: int,
             sampler: str, scorer: str, module: Optional[nn.Module] = None) -> Tokens:
    k = resolve_k(num_tokens, tokens.layout, num_prefix, num_patches)
    return ats_block(block, tokens, num_prefix, k, get_sampler(sampler), get_scorer(scorer).fn)


def evit_step(block: BlockParts, tokens: Tokens, num_prefix: int, num_tokens: NumTokens, num_patches: int,
              sampler: str, scorer: str, module: Optional[nn.Module] = None) -> Tokens:
    return evit_block(block, tokens, num_prefix, uniform_k(num_tokens, tokens.layout.shape[1] - num_prefix))


def tome_step(block: BlockParts, tokens: Tokens, num_prefix: int, num_tokens: NumTokens, num_patches: int,
              sampler: str, scorer: str, module: Optional[nn.Module] = None) -> Tokens:
    return tome_block(block, tokens, num_prefix, uniform_k(num_tokens, tokens.layout.shape[1] - num_prefix))


def dynamicvit_step(block: BlockParts, tokens: Tokens, num_prefix: int, num_tokens: NumTokens, num_patches: int,
                    sampler: str, scorer: str, module: Optional[nn.Module] = None) -> Tokens:
    return dynamicvit_block(block, tokens, num_prefix, uniform_k(num_tokens, tokens.layout.shape[1] - num_prefix),
                            module)


REDUCERS: Dict[str, Step] = {"ats": ats_step, "evit": evit_step, "tome": tome_step, "dynamicvit": dynamicvit_step}
# Reducers with modules of their own to train: only hosts that create them (timm) take these.
TRAINED = ("dynamicvit",)
