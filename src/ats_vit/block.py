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

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from .merging import evit_fuse, size_bias, tome_merge
from .sampling import NumSamples, Sampler
from .scoring import ScoreFn, attention_probs, class_attention_value_norm


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
    _rows: Optional[tuple] = field(default=None, repr=False, compare=False)  # (valid, real_rows()) cache

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
        # index_select: several times faster than advanced indexing on the CPU.
        return torch.index_select(flat, 0, self.index.flatten()).view(*self.shape, *flat.shape[1:])

    def unpad(self, padded: Tensor) -> Tensor:
        """(B, Nmax, ...) -> (T, ...): the inverse of :meth:`pad` on real tokens."""
        if self.valid is None or not self.packed:
            return padded.reshape(-1, *padded.shape[2:])
        return torch.index_select(padded.reshape(-1, *padded.shape[2:]), 0, self.real_rows())

    def real_rows(self) -> Tensor:
        """(T,) positions of the real tokens in the flattened (B * Nmax) padded view."""
        if self._rows is None or self._rows[0] is not self.valid:
            self._rows = (self.valid, self.valid.flatten().nonzero().squeeze(1))
        return self._rows[1]

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
    layout, the original patch index of each image's patch tokens (B, Nmax - prefix), -1 on
    padding or on a token that stands for no single patch, and, once tokens are merged, how many
    patches each token stands for (B, Nmax)."""
    x: Tensor
    layout: Layout
    positions: Tensor
    size: Optional[Tensor] = None

    def padded(self) -> Tensor:
        """(B, Nmax, C) tokens, padding rows arbitrary."""
        return self.layout.pad(self.x)


# Profiler range around scoring and sampling, so benchmarks can time the selection step.
SELECT_RANGE = "ats_vit.select"
# Images per attention call when their token counts differ: packed attention sorts images by
# key count and attends each group of this many at its own padded length, when that cuts the
# padded attention work by more than GROUPING_MIN_SAVING (each call also gathers its rows).
ATTENTION_GROUP = 16
GROUPING_MIN_SAVING = 0.2


def _sdpa(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask if mask.is_floating_point() else logits.masked_fill(~mask, float("-inf"))
    return attn.attn_drop(logits.softmax(dim=-1)) @ v


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, q_valid: Optional[Tensor],
            k_valid: Optional[Tensor], grouped: bool) -> Tensor:
    """Softmax attention of padded queries (B, H, M, d) over padded keys and values (B, H, N, d).

    ``q_valid`` (B, M) and ``k_valid`` (B, N) mark real rows (None: all real); padding keys are
    never attended and padding query rows are left arbitrary. ``grouped`` attends groups of
    images with similar key counts at their own lengths instead of the whole batch at N.
    """
    mask = None if k_valid is None else k_valid[:, None, None, :]
    B = q.shape[0]
    if mask is None or not grouped or B <= ATTENTION_GROUP:
        return _sdpa(attn, q, k, v, mask)
    k_len = k_valid.sum(dim=1)
    q_len = torch.full_like(k_len, q.shape[2]) if q_valid is None else q_valid.sum(dim=1)
    order = k_len.argsort(descending=True)
    groups = order.split(ATTENTION_GROUP)
    sizes = [(int(q_len[ids].max()), int(k_len[ids].max())) for ids in groups]
    work = sum(len(ids) * m * n for ids, (m, n) in zip(groups, sizes))
    if work > (1 - GROUPING_MIN_SAVING) * B * q.shape[2] * k.shape[2]:
        return _sdpa(attn, q, k, v, mask)
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    for ids, (m, n) in zip(groups, sizes):
        out[ids, :, :m] = _sdpa(attn, q[ids, :, :m], k[ids, :, :n], v[ids, :, :n], mask[ids, ..., :n])
    return out


def _drop_path(module: nn.Module, y: Tensor, layout: Layout) -> Tensor:
    """timm's per-image stochastic depth, on flat tokens."""
    prob = getattr(module, "drop_prob", 0.0)
    if not module.training or not prob:
        return y
    keep = y.new_empty(layout.shape[0]).bernoulli_(1.0 - prob)
    if getattr(module, "scale_by_keep", True):
        keep = keep / (1.0 - prob)
    return y * keep[layout.image_of_row()][:, None]


def _attention_residual(block: nn.Module, x: Tensor, h: Optional[Tensor], out: Tensor, layout: Layout) -> Tensor:
    """From the attention output (T, D): output norm, gate (on the normed input ``h``, needed only
    when the attention has a gate), projection and the residual onto ``x``."""
    attn = block.attn
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(h).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return x + _drop_path(block.drop_path1, block.ls1(out), layout)


def _mlp_residual(block: nn.Module, x: Tensor, layout: Layout) -> Tensor:
    return x + _drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), layout)


def _block_tail(block: nn.Module, x: Tensor, h: Optional[Tensor], out: Tensor, layout: Layout) -> Tensor:
    """:func:`_attention_residual` then the MLP residual."""
    return _mlp_residual(block, _attention_residual(block, x, h, out, layout), layout)


def _qkv(attn: nn.Module, h: Tensor, layout: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Normed queries, keys and values (B, H, Nmax, hd) of the normed tokens ``h`` (T, C)."""
    B, N = layout.shape
    qkv = layout.pad(attn.qkv(h)).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def block_forward(block, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """What timm's ``Block.forward`` computes on a batch (B, N, C), from the block's parts, so a
    view of another library's layer with the same parts can stand in for a timm ``Block``."""
    B, N, C = x.shape
    layout = Layout.dense(B, N, x.device, packed=False)
    flat = x.flatten(0, 1)
    h = block.norm1(flat)
    out = _sdpa(block.attn, *_qkv(block.attn, h, layout), attn_mask).transpose(1, 2).flatten(2)
    return _block_tail(block, flat, h, out.flatten(0, 1), layout).view(B, N, C)


def dense_block(block: nn.Module, tokens: Tokens) -> Tokens:
    """A timm ``Block`` on every token, hiding padding keys from its attention."""
    layout = tokens.layout
    if tokens.size is not None:  # merged tokens: every image holds the same count, no padding
        x = block(tokens.padded(), attn_mask=size_bias(tokens.size)).flatten(0, 1)
        return replace(tokens, x=x)
    if layout.valid is None or not layout.packed:
        # The padded batch is what timm's own block expects.
        x = block(tokens.padded(), attn_mask=layout.key_mask()).flatten(0, 1)
        return Tokens(x, layout, tokens.positions)
    h = block.norm1(tokens.x)
    out = _attend(block.attn, *_qkv(block.attn, h, layout), layout.valid, layout.valid, grouped=True)
    out = layout.unpad(out.transpose(1, 2).flatten(2))
    return Tokens(_block_tail(block, tokens.x, h, out, layout), layout, tokens.positions)


def select_rows(tokens: Tokens, index: Tensor, num_prefix: int) -> tuple[Tensor, Layout, Tensor, Tensor]:
    """Where the prefix tokens and the kept patch tokens ``index`` (B, K'max; -1 pads) go.

    Returns:
        kept: (B, P + K'max) columns of the kept tokens in the padded view of ``tokens``;
        their new layout (same kind); their rows in the flat ``tokens.x``, in the new layout's
        flat order; and their original patch positions (B, K'max), -1 on padding.
    """
    layout = tokens.layout
    B = layout.shape[0]
    padded = index < 0
    prefix = torch.arange(num_prefix, device=index.device).expand(B, num_prefix)
    kept = torch.cat([prefix, index.clamp(min=0) + num_prefix], dim=1)
    new_layout = Layout.dense(B, kept.shape[1], index.device, layout.packed)
    if bool(padded.any()):
        new_layout.valid = torch.cat([torch.ones_like(prefix, dtype=torch.bool), ~padded], dim=1)
        if layout.packed:  # each real token's row in the new packed tensor, in (image, token) order
            valid = new_layout.valid
            new_layout.index = (valid.flatten().cumsum(0).view_as(valid) - 1).masked_fill(~valid, 0)
    flat_rows = new_layout.unpad(layout.index.gather(1, kept))
    positions = tokens.positions.gather(1, index.clamp(min=0)).masked_fill(padded, -1)
    return kept, new_layout, flat_rows, positions


def ats_block(
        block: nn.Module,
        tokens: Tokens,
        num_prefix_tokens: int,
        num_samples: NumSamples,
        sampler: Sampler,
        scorer: ScoreFn = class_attention_value_norm,
) -> Tokens:
    """Run a timm ``Block`` with Adaptive Token Sampling inside its attention.

    Queries, keys and values are computed for every token entering the block in one projection
    (faster than a separate query projection for the kept tokens). The prefix tokens' attention
    rows give the scores, ``sampler`` picks the patch tokens to keep, and only the prefix and kept
    tokens get attention rows (over all keys, not renormalised), projection, residual and MLP.
    Selection is not differentiated; gradients flow through the kept rows and the values.
    ``scorer`` (see :mod:`ats_vit.scoring`) replaces the ATS score for ablations.

    Returns:
        the kept tokens (same layout kind, compacted to the batch's largest count); their
        ``positions`` say which original patches they are.
    """
    attn = block.attn
    layout = tokens.layout
    P = num_prefix_tokens
    h = block.norm1(tokens.x)
    q, k, v = _qkv(attn, h, layout)

    with record_function(SELECT_RANGE):
        index = sampler(scorer(q, k, v, P, layout.valid, attn.scale), num_samples)

    kept, new_layout, flat_rows, positions = select_rows(tokens, index, P)
    q = q.gather(2, kept[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    out = _attend(attn, q, k, v, new_layout.valid, layout.valid, layout.packed)
    gate = torch.index_select(h, 0, flat_rows) if getattr(attn, "gate", None) is not None else None
    out = new_layout.unpad(out.transpose(1, 2).flatten(2))
    y = _block_tail(block, torch.index_select(tokens.x, 0, flat_rows), gate, out, new_layout)
    return Tokens(y, new_layout, positions)


def _uniform(tokens: Tokens, name: str) -> tuple[int, int]:
    if tokens.layout.valid is not None:
        raise ValueError(f"{name} blocks need every image to hold the same token count; "
                         "they cannot follow blocks that keep a count per image")
    return tokens.layout.shape


def _attend_all(block: nn.Module, tokens: Tokens) -> tuple[Tensor, Tensor, Tensor]:
    """Attention residual of every token (B, N, C), with ToMe's size bias when sizes are tracked;
    also the normed queries and keys (B, H, N, hd)."""
    attn, (B, N) = block.attn, tokens.layout.shape
    h = block.norm1(tokens.x)
    q, k, v = _qkv(attn, h, tokens.layout)
    out = _sdpa(attn, q, k, v, size_bias(tokens.size)).transpose(1, 2).flatten(2)
    y = _attention_residual(block, tokens.x, h, out.flatten(0, 1), tokens.layout)
    return y.view(B, N, -1), q, k


def _merged_tokens(block: nn.Module, y: Tensor, positions: Tensor, size: Optional[Tensor],
                   packed: bool) -> Tokens:
    """The MLP residual on the reduced tokens (B, N', C)."""
    B, N = y.shape[:2]
    layout = Layout.dense(B, N, y.device, packed)
    return Tokens(_mlp_residual(block, y.flatten(0, 1), layout), layout, positions, size)


def evit_block(block: nn.Module, tokens: Tokens, num_prefix_tokens: int, keep: int) -> Tokens:
    """A timm ``Block`` as EViT runs it: attention over all tokens, then the ``keep`` patch tokens
    the class token attends to most (averaged over heads) go on and the rest are fused into one
    token (:func:`~ats_vit.merging.evit_fuse`) before the MLP."""
    B, N = _uniform(tokens, "EViT")
    P = num_prefix_tokens
    y, q, k = _attend_all(block, tokens)
    if keep >= N - P:  # nothing to fuse
        return _merged_tokens(block, y, tokens.positions, tokens.size, tokens.layout.packed)
    with record_function(SELECT_RANGE):
        cls_attn = attention_probs(q[:, :, :1], k, None, block.attn.scale)[:, :, 0, P:].mean(dim=1)
        y, index = evit_fuse(y, cls_attn, P, keep)
    positions = torch.cat([tokens.positions.gather(1, index), index.new_full((B, 1), -1)], dim=1)
    return _merged_tokens(block, y, positions, None, tokens.layout.packed)


def tome_block(block: nn.Module, tokens: Tokens, num_prefix_tokens: int, merge: int) -> Tokens:
    """A timm ``Block`` as ToMe runs it: proportional attention over all tokens, then ``merge``
    patch tokens merged away (:func:`~ats_vit.merging.tome_merge`, keys averaged over heads as
    the similarity) before the MLP; sizes are tracked for later blocks' attention."""
    B, N = _uniform(tokens, "ToMe")
    P = num_prefix_tokens
    y, _, k = _attend_all(block, tokens)
    merge = min(merge, (N - P + 1) // 2) if N - P >= 2 else 0  # A's size; B must not be empty
    if merge == 0:
        return _merged_tokens(block, y, tokens.positions, tokens.size, tokens.layout.packed)
    size = tokens.size if tokens.size is not None else y.new_ones(B, N)
    with record_function(SELECT_RANGE):
        y, size, source = tome_merge(y, size, k.mean(dim=1), P, merge)
    return _merged_tokens(block, y, tokens.positions.gather(1, source), size, tokens.layout.packed)
