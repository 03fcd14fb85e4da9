"""Compute of a timm Vision Transformer in multiply-accumulates, counted per image from its tokens.

Counted the fvcore way, as the token-reduction literature does: every linear layer, the patch
embedding convolution, and the two attention matmuls (q kᵀ and A v); norms, activations and
softmax are left out. Dense DeiT-S at 224 px is 4.6 GMACs. An ATS block computes queries, keys
and values for all tokens entering it (one fused projection) but attention rows, projection and MLP
only for the tokens it keeps, so its cost depends on both counts; scoring adds the prefix rows'
q kᵀ over all keys (their attention rows are computed again with the kept ones').
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

Count = Union[int, Tensor]


def linear_macs(module: Optional[nn.Module]) -> int:
    """MACs per token of every ``nn.Linear`` inside ``module`` (0 for None)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class BlockCost:
    """Per-token MACs of one transformer block, split by what scales with which token count."""
    qkv: int  # per token entering: query, key and value projection
    per_kept: int  # per token leaving: output projection, gate, MLP
    attn_pair: int  # per (query, key) pair: q kᵀ plus A v

    @classmethod
    def of(cls, block: nn.Module) -> "BlockCost":
        attn = block.attn
        per_kept = linear_macs(attn.proj) + linear_macs(getattr(attn, "gate", None)) + linear_macs(block.mlp)
        return cls(qkv=linear_macs(attn.qkv), per_kept=per_kept, attn_pair=2 * attn.num_heads * attn.head_dim)

    def macs(self, n_in: Count, n_out: Count, scoring_rows: int = 0) -> Count:
        """MACs of the block when ``n_in`` tokens enter and ``n_out`` leave; an ATS block scores
        with ``scoring_rows`` (its prefix tokens') query rows, a dense block with none."""
        return (n_in * self.qkv + n_out * self.per_kept + n_out * n_in * self.attn_pair
                + scoring_rows * n_in * (self.attn_pair // 2))


@dataclass(frozen=True)
class ViTCost:
    """Per-image cost model of a timm ``VisionTransformer``."""
    per_patch: int  # patch embedding, per patch
    head: int  # classifier head(s), per image
    blocks: List[BlockCost]

    @classmethod
    def of(cls, model: nn.Module) -> "ViTCost":
        # A convolution costs its weight's size per output position (out * in/groups * kh * kw).
        per_patch = model.patch_embed.proj.weight.numel()
        head = linear_macs(model.head) + linear_macs(getattr(model, "head_dist", None))
        return cls(per_patch=per_patch, head=head, blocks=[BlockCost.of(b) for b in model.blocks])

    def macs(self, num_patches: int, tokens: Tensor, ats_blocks: Sequence[int] = (),
             num_prefix_tokens: int = 1) -> Tensor:
        """MACs per image from the tokens each block saw.

        Args:
            num_patches: patch tokens the patch embedding produced.
            tokens: (B, depth + 1) tokens (prefix included) entering each block, and leaving the last.
            ats_blocks: the blocks that score and sample tokens.
            num_prefix_tokens: their scoring query rows.
        """
        total = torch.full(tokens.shape[:1], float(num_patches * self.per_patch + self.head),
                           dtype=torch.float64, device=tokens.device)
        t = tokens.to(torch.float64)
        for i, cost in enumerate(self.blocks):
            total = total + cost.macs(t[:, i], t[:, i + 1], num_prefix_tokens if i in ats_blocks else 0)
        return total

    def dense_macs(self, num_patches: int, num_prefix_tokens: int) -> int:
        """MACs of the unpatched model on one image of ``num_patches`` patches."""
        n = num_patches + num_prefix_tokens
        return num_patches * self.per_patch + self.head + sum(c.macs(n, n) for c in self.blocks)
