"""MAC counting: the compute of a Vision Transformer in multiply-accumulates, per image, from the
tokens it kept. Hosts build these cost models from their modules (see :mod:`ats_vit.hosts`).

Counted the fvcore way, as the token-reduction literature does: every linear layer, the patch
embedding convolution, and the two attention matmuls (q kᵀ and A v); norms, activations and
softmax are left out. Dense DeiT-S at 224 px is 4.6 GMACs. An ATS block computes queries, keys
and values for all tokens entering it (one fused projection) but attention rows, projection and MLP
only for the tokens it keeps, so its cost depends on both counts; scoring adds the prefix rows'
q kᵀ over all keys (their attention rows are computed again with the kept ones'). EViT and ToMe
blocks attend with every token and shrink the batch before the MLP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .parts import BlockParts

Count = Union[int, Tensor]


def linear_macs(module: Optional[nn.Module]) -> int:
    """MACs per token of every ``nn.Linear`` inside ``module`` (0 for None)."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def predictor_macs(width: int) -> int:
    """MACs per patch token of DynamicViT's keep predictor on tokens of ``width`` C: its linear
    layers C -> C, C -> C/2, C/2 -> C/4, C/4 -> 2 (see :mod:`ats_vit.reducers.dynamicvit`)."""
    return width * width + width * (width // 2) + (width // 2) * (width // 4) + (width // 4) * 2


@dataclass(frozen=True)
class BlockCost:
    """Per-token MACs of one transformer block, split by what scales with which token count."""
    width: int  # token width C
    head_dim: int
    qkv: int  # per token entering: query, key and value projection
    proj: int  # per attention row: output projection and gate
    mlp: int  # per token leaving
    attn_pair: int  # per (query, key) pair: q kᵀ plus A v

    @classmethod
    def of(cls, block: BlockParts) -> "BlockCost":
        attn = block.attn
        return cls(width=attn.qkv[0].in_features, head_dim=attn.head_dim,
                   qkv=sum(linear_macs(p) for p in attn.qkv),
                   proj=linear_macs(attn.proj) + linear_macs(attn.gate),
                   mlp=linear_macs(block.mlp), attn_pair=2 * attn.num_heads * attn.head_dim)

    def macs(self, n_in: Count, n_out: Count, kind: str = "dense", num_prefix: int = 0,
             scoring_rows: str = "class") -> Count:
        """MACs of the block when ``n_in`` tokens enter and ``n_out`` leave.

        kind: ``"dense"``; ``"ats"`` (attention rows, projection and MLP for the kept tokens only;
        the scorer computes q kᵀ for ``scoring_rows``: the ``"class"`` token's row, ``"all"`` or
        ``"none"``); ``"evit"`` and ``"tome"`` (attention and projection for every token entering,
        the MLP for those leaving; EViT's class row q kᵀ and fusion matmul, ToMe's A-B similarity);
        ``"dynamicvit"`` (the keep predictor on the patch tokens entering, the block on those kept).
        """
        score_pair = self.attn_pair // 2
        if kind == "dense":
            return n_in * (self.qkv + self.proj + self.mlp) + n_in * n_in * self.attn_pair
        if kind == "ats":
            rows = {"class": 1, "all": n_in, "none": 0}[scoring_rows]
            return (n_in * self.qkv + rows * n_in * score_pair
                    + n_out * n_in * self.attn_pair + n_out * (self.proj + self.mlp))
        shared = n_in * (self.qkv + self.proj) + n_in * n_in * self.attn_pair + n_out * self.mlp
        if kind == "evit":  # the fusion weighs every patch token (zero weight on the kept ones)
            return shared + n_in * score_pair + (n_in - num_prefix) * self.width
        if kind == "tome":
            patches = n_in - num_prefix
            return shared + ((patches + 1) // 2) * (patches // 2) * self.head_dim
        if kind == "dynamicvit":  # the keep predictor on the patch tokens entering, then dense on those kept
            return (n_in - num_prefix) * predictor_macs(self.width) + self.macs(n_out, n_out)
        raise ValueError(f"kind must be dense, ats, evit, tome or dynamicvit, got {kind!r}")


@dataclass(frozen=True)
class ViTCost:
    """Per-image cost model of a plain ViT (timm ``VisionTransformer``, transformers ViT/DeiT)."""
    per_patch: int  # patch embedding, per patch: a convolution costs its weight's size per position
    head: int  # classifier head(s), per image
    blocks: List[BlockCost]

    def macs(self, num_patches: int, tokens: Tensor, reduced: Sequence[int] = (), kind: str = "ats",
             num_prefix_tokens: int = 1, scoring_rows: str = "class") -> Tensor:
        """MACs per image from the tokens each block saw.

        Args:
            num_patches: patch tokens the patch embedding produced.
            tokens: (B, depth + 1) tokens (prefix included) entering each block, and leaving the last.
            reduced: the blocks that reduce tokens, as ``kind`` (see :meth:`BlockCost.macs`).
        """
        total = torch.full(tokens.shape[:1], float(num_patches * self.per_patch + self.head),
                           dtype=torch.float64, device=tokens.device)
        t = tokens.to(torch.float64)
        for i, cost in enumerate(self.blocks):
            total = total + cost.macs(t[:, i], t[:, i + 1], kind if i in reduced else "dense",
                                      num_prefix_tokens, scoring_rows)
        return total

    def dense_macs(self, num_patches: int, num_prefix_tokens: int) -> int:
        """MACs of the unpatched model on one image of ``num_patches`` patches."""
        n = num_patches + num_prefix_tokens
        return num_patches * self.per_patch + self.head + sum(c.macs(n, n) for c in self.blocks)


@dataclass(frozen=True)
class ConvCost:
    """A convolution's MACs per output position and the geometry that sets its output grid."""
    per_position: int
    kernel: tuple
    stride: tuple
    padding: tuple

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "ConvCost":
        return cls(conv.weight.numel(), tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return tuple((size + 2 * p - k) // s + 1
                     for size, k, s, p in zip((height, width), self.kernel, self.stride, self.padding))


@dataclass(frozen=True)
class CvtLayerCost:
    """Per-token MACs of one CvT layer (depthwise-convolution q/k/v projections)."""
    width: int
    q_conv: ConvCost
    kv_conv: ConvCost  # the key convolution; the value convolution has the same shape
    q_proj: int  # per query
    kv_proj: int  # per key: key and value projections
    proj: int  # per attention row: output projection
    mlp: int  # per token leaving

    def macs(self, grid: tuple[int, int], n_in: Count, n_out: Count, cls_token: bool, kind: str = "dense") -> Count:
        """MACs on an (H, W) token grid when ``n_in`` tokens enter and ``n_out`` leave (class token
        included). The convolutions run over the whole grid; an ATS layer projects the class query
        and scores with it, then projects the queries of the kept tokens alone and attends with them."""
        q_grid, kv_grid = self.q_conv.grid(*grid), self.kv_conv.grid(*grid)
        keys = kv_grid[0] * kv_grid[1] + int(cls_token)
        convs = (q_grid[0] * q_grid[1] * self.q_conv.per_position
                 + 2 * kv_grid[0] * kv_grid[1] * self.kv_conv.per_position)
        shared = convs + keys * self.kv_proj + n_out * (self.q_proj + keys * 2 * self.width + self.proj + self.mlp)
        if kind == "dense":
            return shared
        if kind == "ats":  # the class query for scoring, and its q kᵀ row
            return shared + self.q_proj + keys * self.width
        raise ValueError(f"kind must be dense or ats for CvT, got {kind!r}")


@dataclass(frozen=True)
class CvtStageCost:
    embedding: ConvCost
    cls_token: bool
    layers: List[CvtLayerCost]


@dataclass(frozen=True)
class CvtCost:
    """Per-image cost model of a transformers CvT encoder (and its head); ATS runs in the last
    stage. Bind it to an input size with :meth:`at`."""
    stages: List[CvtStageCost]
    head: int

    def at(self, height: int, width: int) -> "CvtCostAt":
        return CvtCostAt(self, height, width)


@dataclass(frozen=True)
class CvtCostAt:
    """:class:`CvtCost` at one input size, with :class:`ViTCost`'s ``macs`` / ``dense_macs``
    over the last stage's layers."""
    model: CvtCost
    height: int
    width: int

    def grids(self) -> List[tuple[int, int]]:
        """The (H, W) token grid of each stage."""
        grids, size = [], (self.height, self.width)
        for stage in self.model.stages:
            size = stage.embedding.grid(*size)
            grids.append(size)
        return grids

    def _fixed(self) -> int:
        """MACs of every stage but the last, the last stage's embedding, and the head."""
        grids = self.grids()
        total = self.model.head
        for stage, grid in zip(self.model.stages, grids):
            total += grid[0] * grid[1] * stage.embedding.per_position
        return total + sum(_dense_layers(stage, grid) for stage, grid in zip(self.model.stages[:-1], grids))

    def macs(self, num_patches: int, tokens: Tensor, reduced: Sequence[int] = (), kind: str = "ats",
             num_prefix_tokens: int = 1, scoring_rows: str = "class") -> Tensor:
        """MACs per image from the tokens (B, depth + 1) entering each last-stage layer."""
        stage, grid = self.model.stages[-1], self.grids()[-1]
        total = torch.full(tokens.shape[:1], float(self._fixed()), dtype=torch.float64, device=tokens.device)
        t = tokens.to(torch.float64)
        for i, layer in enumerate(stage.layers):
            total = total + layer.macs(grid, t[:, i], t[:, i + 1], stage.cls_token, kind if i in reduced else "dense")
        return total

    def dense_macs(self, num_patches: int, num_prefix_tokens: int) -> int:
        return self._fixed() + _dense_layers(self.model.stages[-1], self.grids()[-1])


def _dense_layers(stage: CvtStageCost, grid: tuple[int, int]) -> int:
    """MACs of a CvT stage's layers on its full (H, W) token grid."""
    n = grid[0] * grid[1] + int(stage.cls_token)
    return sum(layer.macs(grid, n, n, stage.cls_token) for layer in stage.layers)
