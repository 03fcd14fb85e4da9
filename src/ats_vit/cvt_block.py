"""Run one CvT layer (transformers' ``CvtLayer``) on a batch whose images may keep different tokens.

CvT computes queries, keys and values with depthwise convolutions over the 2-D token grid. Here
the tokens an image still holds go back onto that grid at their original positions, with zeros
where tokens were dropped (the same zeros the convolutions see beyond the border), for those
convolutions only; the linear projections, the attention rows, the output projection and the MLP
then run on the kept tokens alone.

- Queries (stride 1) are read at the kept tokens' positions.
- Keys and values come from the strided grid (CvT-13/21: stride 2). A key whose convolution
  window holds no token of the image stands for nothing and is hidden from the attention. The
  keys are still computed, and counted, for the whole grid.
- ATS score: the class token's attention to each key, summed over heads, times the key's value
  norm (the paper's score on the keys). A token takes the score of the key cell it lies in
  (row // stride, column // stride): with stride 1 that is exactly its own ATS score.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from .block import SELECT_RANGE, Tokens, _attend, _drop_path, select_rows
from .sampling import NumSamples, Sampler, token_scores
from .scoring import attention_probs

Grid = Tuple[int, int]


def grid_of_tokens(patches: Tensor, positions: Tensor, grid: Grid) -> Tensor:
    """Patch tokens (B, n, C) at ``positions`` (B, n; -1 on padding) put onto a (B, C, H, W) grid
    of zeros."""
    B, _, C = patches.shape
    H, W = grid
    spill = H * W  # padding rows land in one extra column, dropped after
    canvas = patches.new_zeros(B, spill + 1, C)
    index = positions.masked_fill(positions < 0, spill)[..., None].expand(-1, -1, C)
    canvas = canvas.scatter(1, index, patches)
    return canvas[:, :spill].transpose(1, 2).reshape(B, C, H, W)


def _occupied_keys(positions: Tensor, grid: Grid, conv: nn.Conv2d) -> Tensor:
    """(B, Hk, Wk) whether each key's convolution window holds a token of the image."""
    B = positions.shape[0]
    H, W = grid
    occupied = torch.zeros(B, H * W + 1, device=positions.device)
    occupied.scatter_(1, positions.masked_fill(positions < 0, H * W), 1.0)
    occupied = occupied[:, :H * W].view(B, 1, H, W)
    return F.max_pool2d(occupied, conv.kernel_size, conv.stride, conv.padding)[:, 0] > 0


def _cell_of_token(positions: Tensor, grid: Grid, key_grid: Grid, stride: Tuple[int, int]) -> Tensor:
    """(B, n) index of the key cell each token lies in (0 on padding)."""
    W = grid[1]
    Hk, Wk = key_grid
    row = (positions.clamp(min=0) // W // stride[0]).clamp(max=Hk - 1)
    col = (positions.clamp(min=0) % W // stride[1]).clamp(max=Wk - 1)
    return row * Wk + col


class _AttentionParams:
    """What :func:`ats_vit.block._attend` reads of an attention module."""
    fused_attn = True

    def __init__(self, module: nn.Module):
        self.scale = module.scale
        self.attn_drop = module.dropout
        self.training = module.training


def _heads(x: Tensor, num_heads: int) -> Tensor:
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)


def cvt_block(layer: nn.Module, tokens: Tokens, grid: Grid,
              select: Optional[Tuple[NumSamples, Sampler]] = None) -> Tokens:
    """A transformers ``CvtLayer`` (with a class token) on ``tokens``.

    Args:
        tokens: the class token, then patch tokens whose ``positions`` index the (H, W) ``grid``.
        select: ``(K, sampler)`` to run ATS inside the layer's attention; None runs it densely.

    Returns:
        the prefix and kept tokens (all of them without ``select``), same layout kind.
    """
    sa = layer.attention.attention
    layout = tokens.layout
    B, N = layout.shape
    C, heads = sa.embed_dim, sa.num_heads
    h = layout.pad(layer.layernorm_before(tokens.x))  # (B, N, C)
    cls, positions = h[:, :1], tokens.positions
    canvas = grid_of_tokens(h[:, 1:], positions, grid)
    key_conv = sa.convolution_projection_key.convolution_projection.convolution
    q_grid = sa.convolution_projection_query(canvas)  # (B, H * W, C)
    keys = torch.cat([cls, sa.convolution_projection_key(canvas)], dim=1)
    values = torch.cat([cls, sa.convolution_projection_value(canvas)], dim=1)
    occupied = _occupied_keys(positions, grid, key_conv)
    key_valid = torch.cat([positions.new_ones(B, 1, dtype=torch.bool), occupied.flatten(1)], dim=1)
    k = _heads(sa.projection_key(keys), heads)
    v = _heads(sa.projection_value(values), heads)

    if select is None:
        kept_layout, rows, kept_positions = layout, None, positions
    else:
        num_samples, sampler = select
        with record_function(SELECT_RANGE):
            q_cls = _heads(sa.projection_query(cls), heads)
            key_scores = token_scores(attention_probs(q_cls, k, key_valid, sa.scale), v, 1, key_valid)
            cells = _cell_of_token(positions, grid, occupied.shape[1:], key_conv.stride)
            scores = key_scores.gather(1, cells)
            scores = scores.masked_fill(positions < 0, 0.0)
            index = sampler(scores / scores.sum(dim=1, keepdim=True), num_samples)
        _, kept_layout, rows, kept_positions = select_rows(tokens, index, 1)

    # Only the tokens that go on get a query projection (the class token's again, with them).
    q_rows = q_grid.gather(1, kept_positions.clamp(min=0)[..., None].expand(-1, -1, C))
    q = _heads(kept_layout.pad(sa.projection_query(kept_layout.unpad(torch.cat([cls, q_rows], dim=1)))), heads)
    # Hidden keys lie anywhere on the grid, not at the end, so images are not grouped by key count.
    out = _attend(_AttentionParams(sa), q, k, v, kept_layout.valid, key_valid, grouped=False)
    out = kept_layout.unpad(out.transpose(1, 2).flatten(2))
    x = tokens.x if rows is None else torch.index_select(tokens.x, 0, rows)
    x = x + _drop_path(layer.drop_path, layer.attention.output(out, None), kept_layout)
    # transformers' CvtLayer drops the path of the MLP output *with* its residual; kept as it is.
    y = _drop_path(layer.drop_path, layer.output(layer.intermediate(layer.layernorm_after(x)), x), kept_layout)
    return Tokens(y, kept_layout, kept_positions)
