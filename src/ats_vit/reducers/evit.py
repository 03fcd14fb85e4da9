"""EViT (Liang et al., ICLR 2022), a rival reducer: the patch tokens the class token attends to
most go on and the rest are fused into one token.

Acts on a batch where every image holds the same token count: x (B, N, C) with P prefix tokens
first, which are never dropped.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.profiler import record_function

from ..core.block import SELECT_RANGE, attend_every_token, mlp_tokens, uniform_shape
from ..core.parts import BlockParts
from ..core.sampling import topk_sampling
from ..core.scoring import attention_probs
from ..core.tokens import Tokens


def evit_fuse(x: Tensor, cls_attn: Tensor, num_prefix: int, k: int) -> Tuple[Tensor, Tensor]:
    """EViT (Liang et al., ICLR 2022): keep the ``k`` patch tokens the class token attends to
    most and fuse the others into one token, their sum weighted by that attention (the paper's
    x_fused = sum_i a_i x_i), appended last.

    Args:
        x: tokens after the attention residual (B, N, C).
        cls_attn: the class token's attention to each patch token, averaged over heads (B, N - P).
        k: patch tokens kept, 1 <= k < N - P.

    Returns:
        tokens (B, P + k + 1, C) and the kept patch indices (B, k), ascending.
    """
    P = num_prefix
    index = topk_sampling(cls_attn, k)
    dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, index, False)
    weights = (cls_attn * dropped).to(x.dtype)
    fused = weights[:, None, :] @ x[:, P:]  # (B, 1, C)
    kept = x[:, P:].gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :P], kept, fused], dim=1), index


def evit_block(block: BlockParts, tokens: Tokens, num_prefix: int, k: int) -> Tokens:
    """The block as EViT runs it: attention over all tokens, then the ``k`` patch tokens the class
    token attends to most (averaged over heads) go on and the rest are fused into one token
    (:func:`evit_fuse`) before the MLP."""
    B, N = uniform_shape(tokens, "EViT")
    P = num_prefix
    y, q, keys = attend_every_token(block, tokens)
    if k >= N - P:  # nothing to fuse
        return mlp_tokens(block, y, tokens, tokens.positions, tokens.size, tokens.key_bias)
    with record_function(SELECT_RANGE):
        cls_attn = attention_probs(q[:, :, :1], keys, None, block.attn.scale)[:, :, 0, P:].mean(dim=1)
        y, index = evit_fuse(y, cls_attn, P, k)
    positions = torch.cat([tokens.positions.gather(1, index), index.new_full((B, 1), -1)], dim=1)
    return mlp_tokens(block, y, tokens, positions)
