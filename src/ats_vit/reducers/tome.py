"""ToMe (Bolya et al., ICLR 2023), a rival reducer: bipartite soft matching merges ``r`` patch
tokens per block, and later blocks attend proportionally to how many patches each token holds.

Acts on a batch where every image holds the same token count: x (B, N, C) with P prefix tokens
first, which are never merged.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.profiler import record_function

from ..core.block import SELECT_RANGE, attend_every_token, mlp_tokens, uniform_shape
from ..core.parts import BlockParts
from ..core.tokens import Tokens


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


def tome_block(block: BlockParts, tokens: Tokens, num_prefix: int, k: int) -> Tokens:
    """The block as ToMe runs it: proportional attention over all tokens, then patch tokens merged
    away down to ``k`` (:func:`tome_merge`, at most half of them per block; keys averaged over
    heads as the similarity) before the MLP. The merged tokens carry their sizes, and log(size) as
    the key bias of the blocks after (proportional attention)."""
    B, N = uniform_shape(tokens, "ToMe")
    P = num_prefix
    y, _, keys = attend_every_token(block, tokens)
    r = N - P - k
    r = min(r, (N - P + 1) // 2) if N - P >= 2 else 0  # A's size; B must not be empty
    if r <= 0:
        return mlp_tokens(block, y, tokens, tokens.positions, tokens.size, tokens.key_bias)
    size = tokens.size if tokens.size is not None else y.new_ones(B, N)
    with record_function(SELECT_RANGE):
        y, size, source = tome_merge(y, size, keys.mean(dim=1), P, r)
    return mlp_tokens(block, y, tokens, tokens.positions.gather(1, source), size, size.log())
