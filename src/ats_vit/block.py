"""Run one timm transformer ``Block`` on a batch whose images may keep different token counts.

A :class:`Tokens` batch is padded: each image's real tokens come first (prefix tokens, then its
kept patch tokens), padding after them, and ``valid`` marks which is which. Padding is never
attended as a key, so an image's real tokens do not depend on the rest of its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import NumSamples, Sampler, token_scores


@dataclass
class Tokens:
    """A padded batch of token sequences.

    x: (B, N, C), prefix tokens first. valid: (B, N) bool, False on padding; None when no image
    is padded. positions: (B, N - prefix) original patch index of each patch token, -1 on padding.
    """
    x: Tensor
    valid: Optional[Tensor]
    positions: Tensor

    def counts(self) -> Tensor:
        """Real tokens (prefix included) per image, (B,)."""
        B, N = self.x.shape[:2]
        if self.valid is None:
            return torch.full((B,), N, dtype=torch.long, device=self.x.device)
        return self.valid.sum(dim=1)

    def key_mask(self) -> Optional[Tensor]:
        """Boolean attention mask (B, 1, 1, N) that hides padding keys, or None."""
        return None if self.valid is None else self.valid[:, None, None, :]


def dense_block(block: nn.Module, tokens: Tokens) -> Tokens:
    """Run a timm ``Block`` unchanged on every token, hiding padding keys from its attention."""
    mask = tokens.key_mask()
    x = block(tokens.x) if mask is None else block(tokens.x, attn_mask=mask)
    return Tokens(x, tokens.valid, tokens.positions)


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def ats_block(
        block: nn.Module,
        tokens: Tokens,
        num_prefix_tokens: int,
        num_samples: NumSamples,
        sampler: Sampler,
) -> tuple[Tokens, Tensor]:
    """Run a timm ``Block`` with Adaptive Token Sampling inside its attention.

    Keys and values are computed for every token entering the block. The prefix tokens' attention
    rows give the scores, ``sampler`` picks the patch tokens to keep, and only the prefix and kept
    tokens get queries, attention rows (over all keys, not renormalised), projection, residual and
    MLP. Selection is not differentiated; gradients flow through the kept rows and the values.

    Returns:
        the kept tokens, compacted to the batch's largest count, and the kept patch indices into
        the incoming patch tokens (B, K'max), -1 on padding.
    """
    attn = block.attn
    P = num_prefix_tokens
    x = tokens.x
    B, N, C = x.shape
    H, hd = attn.num_heads, attn.head_dim
    D = H * hd
    mask = tokens.key_mask()

    h = block.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    kv = F.linear(h, w[D:], None if b is None else b[D:]).reshape(B, N, 2, H, hd).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    k = attn.k_norm(k)

    def queries(rows: Tensor) -> Tensor:
        q = F.linear(rows, w[:D], None if b is None else b[:D])
        return attn.q_norm(q.reshape(B, rows.shape[1], H, hd).transpose(1, 2))

    # Prefix rows need their probabilities (the class row scores the patch tokens).
    logits = (queries(h[:, :P]) * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    prefix_attn = logits.softmax(dim=-1)
    scores = token_scores(prefix_attn, v, P, tokens.valid)
    index = sampler(scores, num_samples)

    rows = torch.cat([torch.arange(P, device=x.device).expand(B, P), index.clamp(min=0) + P], dim=1)
    h_kept = _gather_tokens(h, rows[:, P:])
    q_kept = queries(h_kept)
    out_prefix = attn.attn_drop(prefix_attn) @ v.to(prefix_attn.dtype)
    if attn.fused_attn:
        out_kept = F.scaled_dot_product_attention(
            q_kept, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0,
            scale=attn.scale)
    else:
        kept_logits = (q_kept * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            kept_logits = kept_logits.masked_fill(~mask, float("-inf"))
        out_kept = attn.attn_drop(kept_logits.softmax(dim=-1)) @ v
    out = torch.cat([out_prefix.to(out_kept.dtype), out_kept], dim=2)
    out = attn.norm(out.transpose(1, 2).reshape(B, rows.shape[1], D))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(torch.cat([h[:, :P], h_kept], dim=1)).sigmoid()
    out = attn.proj_drop(attn.proj(out))

    y = _gather_tokens(x, rows) + block.drop_path1(block.ls1(out))
    y = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))

    padded = index < 0
    valid = None
    if bool(padded.any()):
        valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=x.device), ~padded], dim=1)
    positions = tokens.positions.gather(1, index.clamp(min=0)).masked_fill(padded, -1)
    return Tokens(y, valid, positions), index
