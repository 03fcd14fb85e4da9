"""One explicit record of a transformer block's parts, which every host builds from its own
modules: the kernels in :mod:`ats_vit.core.block` and the MAC counts read these records, never a
host library's classes. A record holds the host's modules themselves, so training mode, device
moves and loaded weights reach it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AttentionParts:
    """Multi-head self-attention as the kernels run it.

    qkv: one fused projection (C -> 3 * heads * head_dim, queries then keys then values) or three
        (queries, keys, values), run as one.
    owner: the host's attention module; its ``training`` flag switches attention dropout.
    fused: scaled-dot-product attention (True) or the explicit softmax (timm's ``fused_attn=False``).
    """
    owner: nn.Module
    qkv: Tuple[nn.Linear, ...]
    num_heads: int
    head_dim: int
    scale: float
    dropout: float
    proj: nn.Module
    proj_drop: nn.Module
    q_norm: nn.Module
    k_norm: nn.Module
    norm: nn.Module
    gate: Optional[nn.Linear] = None
    fused: bool = True

    def project(self, h: Tensor) -> Tensor:
        """(T, C) normed tokens -> (T, 3 * heads * head_dim) queries, keys and values."""
        if len(self.qkv) == 1:
            return self.qkv[0](h)
        bias = None if self.qkv[0].bias is None else torch.cat([p.bias for p in self.qkv])
        return F.linear(h, torch.cat([p.weight for p in self.qkv]), bias)

    @property
    def dropout_p(self) -> float:
        return self.dropout if self.owner.training else 0.0


@dataclass(frozen=True)
class BlockParts:
    """A pre-norm transformer block: x + drop_path1(ls1(attention(norm1(x)))), then
    x + drop_path2(ls2(mlp(norm2(x)))); the drop paths act per image (see
    :func:`~ats_vit.core.tokens.drop_path`)."""
    attn: AttentionParts
    norm1: nn.Module
    norm2: nn.Module
    mlp: nn.Module
    ls1: nn.Module
    ls2: nn.Module
    drop_path1: nn.Module
    drop_path2: nn.Module
