"""Token scores: pure tensor functions that score patch tokens inside an attention block (the
paper's score and the ablations' scores), chosen by name through :data:`SCORERS`.

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

from . import native
from .registry import Registry

ScoreFn = Callable[[Tensor, Tensor, Tensor, int, Optional[Tensor], float], Tensor]


def token_scores(
        attn: Tensor,
        v: Tensor,
        num_prefix_tokens: int = 1,
        token_mask: Optional[Tensor] = None,
        value_norm: bool = True,
) -> Tensor:
    """Significance score of each patch token, normalised to sum 1 over each row's real tokens.

    The score of patch token j is the class token's attention to j summed over heads, times the
    norm of j's value vector with all heads concatenated (ATS, Fayyaz et al. 2022, eq. 4);
    without ``value_norm``, the attention alone (the paper's ablation).

    Args:
        attn: softmaxed attention (B, H, Nq, N) whose query row 0 is the class token's;
            usually Nq == N, but only row 0 is read.
        v: values (B, H, N, d).
        num_prefix_tokens: leading tokens (class, distillation, register) that get no score.
        token_mask: bool, False marks padding; (B, N) over all tokens or (B, n) over patch tokens.

    Returns:
        scores (B, n), n = N - num_prefix_tokens, in float32 or wider (float64 inputs stay
        float64); padding scores 0.
    """
    if attn.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attn and v must be 4-D (B, H, Nq, N) and (B, H, N, d), "
                         f"got {tuple(attn.shape)} and {tuple(v.shape)}")
    B, H, _, N = attn.shape
    if v.shape[:3] != (B, H, N):
        raise ValueError(f"v must be (B, H, N, d) = ({B}, {H}, {N}, d), got {tuple(v.shape)}")
    if not 0 < num_prefix_tokens < N + 1 or num_prefix_tokens != int(num_prefix_tokens):
        raise ValueError(f"num_prefix_tokens must be an int in [1, {N}], got {num_prefix_tokens}")
    P = num_prefix_tokens
    dtype = torch.promote_types(torch.promote_types(attn.dtype, v.dtype), torch.float32)
    scores = attn[:, :, 0, P:].sum(dim=1, dtype=dtype)
    if value_norm:
        scores = scores * torch.linalg.vector_norm(v[:, :, P:], dim=(1, 3), dtype=dtype)  # over heads, head dims
    if token_mask is not None:
        if token_mask.shape == (B, N):
            token_mask = token_mask[:, P:]
        if token_mask.shape != scores.shape or token_mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be a bool tensor of shape ({B}, {N}) or "
                             f"({B}, {N - P}), got {token_mask.dtype} {tuple(token_mask.shape)}")
        scores = scores.masked_fill(~token_mask, 0.0)
    total = scores.sum(dim=-1, keepdim=True)
    return scores / total.clamp_min(torch.finfo(scores.dtype).tiny)


@dataclass(frozen=True)
class Scorer:
    fn: ScoreFn
    query_rows: str  # "class": the class token's row of q kᵀ; "all": every row's; "none"


def attention_probs(q: Tensor, k: Tensor, valid: Optional[Tensor], scale: float) -> Tensor:
    """Softmaxed attention of queries (B, H, M, d) over keys (B, H, N, d), padding keys hidden,
    in float32 or wider whatever the inputs' precision and any autocast: in bfloat16 the small
    attention weights that decide the selection round to a few values, and a sampled set of
    tokens amplifies each rounding into a different set."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        logits = (q.to(dtype) * scale) @ k.to(dtype).transpose(-2, -1)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)


def class_attention_value_norm(q, k, v, num_prefix: int, valid, scale) -> Tensor:
    """ATS: the class token's attention summed over heads, times the value norm, in float64:
    :func:`token_scores` of the class row's attention. On the CPU one native op (see
    :mod:`ats_vit.core.native`); elsewhere :func:`class_attention_value_norm_reference`."""
    if q.device.type == "cpu" and native.available():
        return torch.ops.ats_vit.cls_value_scores(q.detach(), k.detach(), v.detach(), valid, scale, num_prefix)
    return class_attention_value_norm_reference(q, k, v, num_prefix, valid, scale)


def class_attention_value_norm_reference(q, k, v, num_prefix: int, valid, scale) -> Tensor:
    """:func:`class_attention_value_norm` in PyTorch operations, for any device: the twin of the
    native CPU op ``ats_vit::cls_value_scores`` (same scores, bit for bit). Float64 whatever the
    inputs' precision and any autocast, every sum taken in index order (a cumulative sum's last
    element; on the CPU torch's cumsum adds sequentially), which fixes each result to the bit.
    exp and sqrt go through the same ATen kernels, on contiguous tensors of the same shapes, in
    both (their vectorised and scalar paths round differently).
    """
    P = num_prefix
    with torch.autocast(q.device.type, enabled=False):
        q0 = q[:, :, 0].double() * scale  # (B, H, d)
        logits = (q0[:, :, None, :] * k.double()).cumsum(-1)[..., -1]  # (B, H, N)
        if valid is not None:
            logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        e = (logits - logits.amax(-1, keepdim=True)).exp()
        probs = e / e.cumsum(-1)[..., -1:]
        cls = probs[:, :, P:].cumsum(1)[:, -1]  # summed over heads, (B, n)
        vv = v[:, :, P:].double()
        norm = (vv * vv).transpose(1, 2).flatten(2).cumsum(-1)[..., -1].contiguous().sqrt()  # over heads, head dims
        scores = cls * norm
        if valid is not None:
            scores = scores.masked_fill(~valid[:, P:], 0.0)
        return scores / scores.cumsum(-1)[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)


def class_attention(q, k, v, num_prefix: int, valid, scale) -> Tensor:
    """The class token's attention summed over heads alone (no value norm)."""
    return token_scores(attention_probs(q[:, :, :1], k, valid, scale), v, num_prefix, valid, value_norm=False)


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


SCORERS: Registry[Scorer] = Registry("scorer", {
    "cls_value": Scorer(class_attention_value_norm, "class"),
    "cls": Scorer(class_attention, "class"),
    "all_queries": Scorer(all_queries_attention, "all"),
    "random": Scorer(random_scores, "none"),
})


def list_scorers() -> list[str]:
    """Names accepted by ``scorer=``."""
    return SCORERS.names()


def get_scorer(name: str) -> Scorer:
    """The scoring rule registered as ``name``; a ValueError lists the allowed names otherwise."""
    return SCORERS.get(name)
