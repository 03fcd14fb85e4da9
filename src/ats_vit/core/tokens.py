"""A batch of token sequences whose images may hold different token counts, and row selection.

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

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

# Devices where reading a tensor's values on the host costs nothing; on the others (CUDA) each
# read waits for the device, so the token bookkeeping reads once per reducing block.
HOST_DEVICES = ("cpu",)


def host_values(t: Tensor) -> Union[int, float, list]:
    """``t``'s values on the host: the one way the token bookkeeping reads a device tensor (a
    synchronisation on an accelerator)."""
    return t.tolist()


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

    def real_rows(self, total: Optional[int] = None) -> Tensor:
        """(T,) positions of the real tokens in the flattened (B * Nmax) padded view; ``total``,
        T when the caller knows it, spares a host read."""
        if self._rows is None or self._rows[0] is not self.valid:
            flat = self.valid.flatten()
            rows = flat.nonzero() if total is None else torch.nonzero_static(flat, size=total)
            self._rows = (self.valid, rows.squeeze(1))
        return self._rows[1]

    def key_mask(self) -> Optional[Tensor]:
        """Boolean attention mask (B, 1, 1, Nmax) that hides padding keys, or None."""
        return None if self.valid is None else self.valid[:, None, None, :]

    def counts(self) -> Tensor:
        """Real tokens per image, (B,)."""
        B, N = self.shape
        if self.valid is None:
            # ones times N, not torch.full: inductor's pass that folds a cumsum of a full tensor
            # (row_offsets) fails when N is a symbolic size (torch 2.14, pointless_cumsum_replacement)
            return torch.ones(B, dtype=torch.long, device=self.index.device) * N
        return self.valid.sum(dim=1)

    def image_of_row(self) -> Tensor:
        """(T,) the image each flat row belongs to."""
        B, N = self.shape
        images = torch.arange(B, device=self.index.device)[:, None].expand(B, N).reshape(-1)
        return images[self.real_rows()] if self.packed and self.valid is not None else images


@dataclass
class Tokens:
    """A batch of token sequences: flat tokens (T, C), prefix tokens first in each image, and
    their layout.

    positions: (B, Nmax - prefix) original patch index of each image's patch tokens, -1 on
        padding or on a token that stands for no single patch.
    size: (B, Nmax) how many patches each token stands for, once tokens are merged (else None);
        pooling weighs tokens by it.
    key_bias: (B, Nmax) a reducer's additive attention-logit bias per key for the blocks after
        it (None: none).
    keep: (B, Nmax) a training-time keep mask (DynamicViT's, differentiable; 1 kept, 0 dropped):
        the blocks after it attend to no dropped token but a token's own (None: all kept).
    """
    x: Tensor
    layout: Layout
    positions: Tensor
    size: Optional[Tensor] = None
    key_bias: Optional[Tensor] = None
    keep: Optional[Tensor] = None

    def padded(self) -> Tensor:
        """(B, Nmax, C) tokens, padding rows arbitrary."""
        return self.layout.pad(self.x)

    def pool_weight(self) -> Optional[Tensor]:
        """(B, Nmax) each token's weight in pooling, or None when all weigh one: a merged token
        weighs the patches it holds; a token a training mask dropped, and padding, weigh nothing."""
        return next((w for w in (self.size, self.keep, self.layout.valid) if w is not None), None)


def select_rows(tokens: Tokens, index: Tensor, num_prefix: int) -> tuple[Tensor, Layout, Tensor, Tensor]:
    """Where the prefix tokens and the kept patch tokens ``index`` (B, W; -1 pads) go. One host
    read (the kept counts' largest, smallest and total) sizes everything.

    Returns:
        kept: (B, P + K'max) columns of the kept tokens in the padded view of ``tokens``;
        their new layout (same kind); their rows in the flat ``tokens.x``, in the new layout's
        flat order; and their original patch positions (B, K'max), -1 on padding.
    """
    layout = tokens.layout
    B = layout.shape[0]
    counts = (index >= 0).sum(dim=1)
    kmax, kmin, total = host_values(torch.stack([counts.max(), counts.min(), counts.sum()])) if B else (0, 0, 0)
    index = index[:, :kmax]
    padded = index < 0
    prefix = torch.arange(num_prefix, device=index.device).expand(B, num_prefix)
    kept = torch.cat([prefix, index.clamp(min=0) + num_prefix], dim=1)
    new_layout = Layout.dense(B, kept.shape[1], index.device, layout.packed)
    if kmin < kmax:
        new_layout.valid = torch.cat([torch.ones_like(prefix, dtype=torch.bool), ~padded], dim=1)
        if layout.packed:  # each real token's row in the new packed tensor, in (image, token) order
            valid = new_layout.valid
            new_layout.index = (valid.flatten().cumsum(0).view_as(valid) - 1).masked_fill(~valid, 0)
            new_layout.real_rows(B * num_prefix + total)
    flat_rows = new_layout.unpad(layout.index.gather(1, kept))
    positions = tokens.positions.gather(1, index.clamp(min=0)).masked_fill(padded, -1)
    return kept, new_layout, flat_rows, positions


def drop_path(module: nn.Module, y: Tensor, layout: Layout) -> Tensor:
    """Per-image stochastic depth of ``module`` (timm's ``DropPath`` attributes ``drop_prob`` and
    ``scale_by_keep``; anything else is the identity) on flat tokens."""
    prob = getattr(module, "drop_prob", 0.0)
    if not module.training or not prob:
        return y
    keep = y.new_empty(layout.shape[0]).bernoulli_(1.0 - prob)
    if getattr(module, "scale_by_keep", True):
        keep = keep / (1.0 - prob)
    return y * keep[layout.image_of_row()][:, None]
