"""Pure tensor functions that score patch tokens inside an attention block (ATS and ablations).

Every scorer has the same contract (a ``Scorer``): normed queries, keys and values (B, H, N, d)
of the tokens entering the block, the prefix token count P, a (B, N) bool mask of real tokens
(None: all real) and the attention scale in; scores (B, N - P) out, normalised to sum 1 over each
row's real tokens, 0 on padding. Each also says how many query rows' q kᵀ it computes, so the
block's MACs count them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .sampling import token_scores

ScoreFn = Callable[[Tensor, Tensor, Tensor, int, Optional[Tensor], float], Tensor]


@dataclass(frozen=True)
class Scorer:
    fn: ScoreFn
    query_rows: str  # "prefix": the P prefix rows' q kᵀ; "all": every row's; "none"


def attention_probs(q: Tensor, k: Tensor, valid: Optional[Tensor], scale: float) -> Tensor:
    """Softmaxed attention of queries (B, H, M, d) over keys (B, H, N, d), padding keys hidden."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


def class_attention_value_norm(q, k, v, num_prefix: int, valid, scale) -> Tensor:
    """ATS: the class token's attention summed over heads, times the value norm."""
    return token_scores(attention_probs(q[:, :, :num_prefix], k, valid, scale), v, num_prefix, valid)


def class_attention(q, k, v, num_prefix: int, valid, scale) -> Tensor:
    """The class token's attention summed over heads alone (no value norm)."""
    return token_scores(attention_probs(q[:, :, :num_prefix], k, valid, scale), v, num_prefix, valid,
                        value_norm=False)


def all_queries_attention(q, k, v, num_prefix: int, valid, scale) -> Tensor:
    """Attention each token receives summed over every real query row and head."""
    probs = attention_probs(q, k, valid, scale)
    if valid is not None:
        probs = probs * valid[:, None, :, None]
    received = probs.sum(dim=(1, 2))[:, None, None, :]  # (B, 1, 1, N): one "row 0" for token_scores
    return token_scores(received, v[:, :1], num_prefix, valid, value_norm=False)


def random_scores(q, k, v, num_prefix: int, valid, scale) -> Tensor:
    """Uniform random scores from torch's generator: the no-information baseline."""
    B, N = q.shape[0], q.shape[2]
    scores = torch.rand(B, N - num_prefix, dtype=torch.float64, device=q.device)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, num_prefix:], 0.0)
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


SCORERS = {
    "cls_value": Scorer(class_attention_value_norm, "prefix"),
    "cls": Scorer(class_attention, "prefix"),
    "all_queries": Scorer(all_queries_attention, "all"),
    "random": Scorer(random_scores, "none"),
}
