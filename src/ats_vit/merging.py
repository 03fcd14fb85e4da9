"""Pure tensor functions of the rival reducers: EViT's fusion and ToMe's bipartite soft matching.

Both act on a batch where every image holds the same token count: x (B, N, C) with P prefix
tokens first, which are never dropped or merged.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .sampling import topk_sampling


def evit_fuse(x: Tensor, cls_attn: Tensor, num_prefix: int, keep: int) -> Tuple[Tensor, Tensor]:
    """EViT (Liang et al., ICLR 2022): keep the ``keep`` patch tokens the class token attends to
    most and fuse the others into one token, their sum weighted by that attention (the paper's
    x_fused = sum_i a_i x_i), appended last.

    Args:
        x: tokens after the attention residual (B, N, C).
        cls_attn: the class token's attention to each patch token, averaged over heads (B, N - P).
        keep: patch tokens kept, 1 <= keep < N - P.

    Returns:
        tokens (B, P + keep + 1, C) and the kept patch indices (B, keep), ascending.
    """
    P = num_prefix
    index = topk_sampling(cls_attn, keep)
    dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, index, False)
    weights = (cls_attn * dropped).to(x.dtype)
    fused = weights[:, None, :] @ x[:, P:]  # (B, 1, C)
    kept = x[:, P:].gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :P], kept, fused], dim=1), index


def tome_merge(x: Tensor, size: Tensor, metric: Tensor, num_prefix: int, r: int) -> Tuple[Tensor, Tensor, Tensor]:
    """ToMe (Bolya et al., ICLR 2023) bipartite soft matching: merge ``r`` patch tokens per image.

    Patch tokens alternate into sets A (even) and B (odd); each A token's most similar B token
    (cosine similarity of ``metric``) is its edge; the ``r`` A tokens with the strongest edges are
    merged into their B tokens by a size-weighted average, and sizes add up. The output holds the
    prefix tokens, the unmerged A tokens, then the B tokens, each group in its original order.

    Args:
        x: tokens (B, N, C); size: how many patches each token stands for (B, N).
        metric: (B, N, d) the similarity features (the keys averaged over heads).
        r: tokens to merge, 1 <= r <= the size of A, with B not empty.

    Returns:
        merged tokens (B, N - r, C), their sizes (B, N - r), and for each output patch token the
        index of the input patch token it continues (B, N - P - r).
    """
    P = num_prefix
    feats = metric[:, P:] / metric[:, P:].norm(dim=-1, keepdim=True)
    a, b = feats[:, ::2], feats[:, 1::2]
    B = a.shape[0]
    edge, match = (a @ b.transpose(-1, -2)).max(dim=-1)
    order = edge.argsort(dim=-1, descending=True, stable=True)
    merged, unmerged = order[:, :r], order[:, r:].sort(dim=-1).values
    C = x.shape[-1]
    xa, xb = x[:, P:][:, ::2], x[:, P:][:, 1::2]
    sa, sb = size[:, P:][:, ::2], size[:, P:][:, 1::2]
    dst = match.gather(1, merged)
    total_b = sb.scatter_add(1, dst, sa.gather(1, merged))
    weighted_b = (xb * sb[..., None]).scatter_add(
        1, dst[..., None].expand(-1, -1, C), (xa * sa[..., None]).gather(1, merged[..., None].expand(-1, -1, C)))
    keep_a = xa.gather(1, unmerged[..., None].expand(-1, -1, C))
    out = torch.cat([x[:, :P], keep_a, weighted_b / total_b[..., None]], dim=1)
    out_size = torch.cat([size[:, :P], sa.gather(1, unmerged), total_b], dim=1)
    source = torch.cat([2 * unmerged, 2 * torch.arange(xb.shape[1], device=x.device).expand(B, -1) + 1], dim=1)
    return out, out_size, source


def size_bias(size: Optional[Tensor]) -> Optional[Tensor]:
    """ToMe's proportional attention: log(size) added to the attention logits of each key
    (B, 1, 1, N); None when no token was merged."""
    return None if size is None else size.log()[:, None, None, :]
