"""Run one timm transformer ``Block`` on a batch whose images may keep different token counts.

Tokens live in a flat (T, C) tensor and a :class:`Layout` says where each image's tokens are.
Two layouts:

- padded (the released implementation's): T = B * Nmax, each image's real tokens first, padding
  after them; every token-wise layer also runs on the padding.
- packed: T = the real tokens only, so norms, projections and MLPs cost exactly the tokens kept;
  only attention gathers each image's tokens into a padded (B, Nmax) view.

Either way padding is never attended as a key, so an image's real tokens do not depend on the
rest of its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import NumSamples, Sampler, token_scores


@dataclass
class Layout:
    """Where B images' token sequences sit in a flat (T, C) token tensor.

    index: (B, Nmax) flat row of each image's j-th token (an arbitrary real row on padding).
    valid: (B, Nmax) bool, False on padding; None when no image is padded.
    packed: the flat tensor holds real tokens only; else it is the padded (B * Nmax) batch.
    """
    index: Tensor
    valid: Optional[Tensor]
    packed: bool

    @classmethod
    def dense(cls, batch: int, width: int, device: torch.device, packed: bool) -> "Layout":
        return cls(torch.arange(batch * width, device=device).view(batch, width), None, packed)

    @property
    def shape(self) -> tuple[int, int]:
        return self.index.shape[0], self.index.shape[1]

    def pad(self, flat: Tensor) -> Tensor:
        """(T, ...) -> (B, Nmax, ...)."""
        if self.valid is None or not self.packed:
            return flat.view(*self.shape, *flat.shape[1:])
        return flat[self.index]

    def unpad(self, padded: Tensor) -> Tensor:
        """(B, Nmax, ...) -> (T, ...): the inverse of :meth:`pad` on real tokens."""
        if self.valid is None or not self.packed:
            return padded.reshape(-1, *padded.shape[2:])
        return padded[self.valid]

    def key_mask(self) -> Optional[Tensor]:
        """Boolean attention mask (B, 1, 1, Nmax) that hides padding keys, or None."""
        return None if self.valid is None else self.valid[:, None, None, :]

    def counts(self) -> Tensor:
        """Real tokens per image, (B,)."""
        B, N = self.shape
        if self.valid is None:
            return torch.full((B,), N, dtype=torch.long, device=self.index.device)
        return self.valid.sum(dim=1)

    def image_of_row(self) -> Tensor:
        """(T,) the image each flat row belongs to."""
        B, N = self.shape
        images = torch.arange(B, device=self.index.device)[:, None].expand(B, N)
        return images[self.valid] if self.packed and self.valid is not None else images.reshape(-1)


@dataclass
class Tokens:
    """A batch of token sequences: flat tokens (T, C), prefix tokens first in each image, their
    layout, and the original patch index of each image's patch tokens (B, Nmax - prefix), -1 on
    padding."""
    x: Tensor
    layout: Layout
    positions: Tensor

    def padded(self) -> Tensor:
        """(B, Nmax, C) tokens, padding rows arbitrary."""
        return self.layout.pad(self.x)


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Softmax attention of queries (B, H, M, d) over keys and values (B, H, N, d)."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return attn.attn_drop(logits.softmax(dim=-1)) @ v


def _drop_path(module: nn.Module, y: Tensor, layout: Layout) -> Tensor:
    """timm's per-image stochastic depth, on flat tokens."""
    prob = getattr(module, "drop_prob", 0.0)
    if not module.training or not prob:
        return y
    keep = y.new_empty(layout.shape[0]).bernoulli_(1.0 - prob)
    if getattr(module, "scale_by_keep", True):
        keep = keep / (1.0 - prob)
    return y * keep[layout.image_of_row()][:, None]


def _block_tail(block: nn.Module, x: Tensor, h: Optional[Tensor], out: Tensor, layout: Layout) -> Tensor:
    """From the attention output (T, D) on: output norm, gate (on the normed input ``h``, needed
    only when the attention has a gate), projection, residuals and MLP."""
    attn = block.attn
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(h).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    x = x + _drop_path(block.drop_path1, block.ls1(out), layout)
    return x + _drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), layout)


def dense_block(block: nn.Module, tokens: Tokens) -> Tokens:
    """A timm ``Block`` on every token, hiding padding keys from its attention."""
    layout = tokens.layout
    if layout.valid is None or not layout.packed:
        # The padded batch is what timm's own block expects.
        x = block(tokens.padded(), attn_mask=layout.key_mask()).flatten(0, 1)
        return Tokens(x, layout, tokens.positions)
    attn = block.attn
    B, N = layout.shape
    h = block.norm1(tokens.x)
    qkv = layout.pad(attn.qkv(h)).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = _attend(attn, attn.q_norm(q), attn.k_norm(k), v, layout.key_mask())
    out = layout.unpad(out.transpose(1, 2).flatten(2))
    return Tokens(_block_tail(block, tokens.x, h, out, layout), layout, tokens.positions)


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
        the kept tokens (same layout kind, compacted to the batch's largest count) and the kept
        patch indices into the incoming patch tokens (B, K'max), -1 on padding.
    """
    attn = block.attn
    layout = tokens.layout
    P = num_prefix_tokens
    B, N = layout.shape
    H, hd = attn.num_heads, attn.head_dim
    D = H * hd
    mask = layout.key_mask()

    h = block.norm1(tokens.x)
    w, b = attn.qkv.weight, attn.qkv.bias
    kv = layout.pad(F.linear(h, w[D:], None if b is None else b[D:]))
    k, v = kv.view(B, N, 2, H, hd).permute(2, 0, 3, 1, 4).unbind(0)
    k = attn.k_norm(k)

    def queries(rows: Tensor) -> Tensor:
        q = F.linear(rows, w[:D], None if b is None else b[:D])
        return attn.q_norm(q.view(B, rows.shape[1], H, hd).transpose(1, 2))

    # Prefix rows need their probabilities (the class row scores the patch tokens).
    prefix_rows = layout.index[:, :P]
    logits = (queries(h[prefix_rows]) * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    prefix_attn = logits.softmax(dim=-1)
    index = sampler(token_scores(prefix_attn, v, P, layout.valid), num_samples)

    padded = index < 0
    kept_rows = layout.index.gather(1, index.clamp(min=0) + P)
    q_kept = queries(h[kept_rows])
    out_prefix = attn.attn_drop(prefix_attn) @ v.to(prefix_attn.dtype)
    out_kept = _attend(attn, q_kept, k, v, mask)
    out = torch.cat([out_prefix.to(out_kept.dtype), out_kept], dim=2).transpose(1, 2).flatten(2)

    rows = torch.cat([prefix_rows, kept_rows], dim=1)  # (B, P + K'max) rows of the incoming tokens
    valid = None
    if bool(padded.any()):
        valid = torch.cat([torch.ones(B, P, dtype=torch.bool, device=index.device), ~padded], dim=1)
    new_layout = Layout.dense(B, rows.shape[1], index.device, layout.packed)
    if valid is not None:
        new_layout.valid = valid
        if layout.packed:  # each real token's row in the new packed tensor, in (image, token) order
            new_layout.index = (valid.flatten().cumsum(0).view_as(valid) - 1).masked_fill(~valid, 0)
    flat_rows = new_layout.unpad(rows)
    h_kept = h[flat_rows] if getattr(attn, "gate", None) is not None else None
    y = _block_tail(block, tokens.x[flat_rows], h_kept, new_layout.unpad(out), new_layout)
    positions = tokens.positions.gather(1, index.clamp(min=0)).masked_fill(padded, -1)
    return Tokens(y, new_layout, positions), index
