"""The transformers host for CvT: ATS in the last stage, the only one with a class token, whose
``CvtEncoder`` class is swapped; each of that stage's layers (``CvtLayer``) runs on a batch whose
images may keep different tokens. The encoder's ``last_hidden_state`` grid holds the kept tokens
at their positions and zeros where tokens were dropped.

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

from ..core.block import SELECT_RANGE, attend
from ..core.budget import NumTokens, resolve_k
from ..core.macs import ConvCost, CvtCost, CvtLayerCost, CvtStageCost, linear_macs
from ..core.sampling import K, Sampler, get_sampler
from ..core.scoring import attention_probs, token_scores
from ..core.tokens import Tokens, drop_path, select_rows
from .hf import backbone, refuse
from .patch import Patch, PatchConfig, check_unpatched, checked_config, install, patch_of, run_blocks

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


def _heads(x: Tensor, num_heads: int) -> Tensor:
    B, N, C = x.shape
    return x.view(B, N, num_heads, C // num_heads).transpose(1, 2)


def cvt_block(layer: nn.Module, tokens: Tokens, grid: Grid,
              select: Optional[Tuple[K, Sampler]] = None) -> Tokens:
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
        k_, sampler = select
        with record_function(SELECT_RANGE):
            q_cls = _heads(sa.projection_query(cls), heads)
            key_scores = token_scores(attention_probs(q_cls, k, key_valid, sa.scale), v, 1, key_valid)
            cells = _cell_of_token(positions, grid, occupied.shape[1:], key_conv.stride)
            scores = key_scores.gather(1, cells)
            scores = scores.masked_fill(positions < 0, 0.0)
            index = sampler(scores / scores.sum(dim=1, keepdim=True), k_)
        _, kept_layout, rows, kept_positions = select_rows(tokens, index, 1)

    # Only the tokens that go on get a query projection (the class token's again, with them).
    q_rows = q_grid.gather(1, kept_positions.clamp(min=0)[..., None].expand(-1, -1, C))
    q = _heads(kept_layout.pad(sa.projection_query(kept_layout.unpad(torch.cat([cls, q_rows], dim=1)))), heads)
    # Hidden keys lie anywhere on the grid, not at the end, so images are not grouped by key count.
    dropout = sa.dropout.p if sa.training else 0.0
    out = attend(q, k, v, kept_layout.valid, key_valid, False, sa.scale, dropout)
    out = kept_layout.unpad(out.transpose(1, 2).flatten(2))
    x = tokens.x if rows is None else torch.index_select(tokens.x, 0, rows)
    x = x + drop_path(layer.drop_path, layer.attention.output(out, None), kept_layout)
    # transformers' CvtLayer drops the path of the MLP output *with* its residual; kept as it is.
    y = drop_path(layer.drop_path, layer.output(layer.intermediate(layer.layernorm_after(x)), x), kept_layout)
    return Tokens(y, kept_layout, kept_positions)


def _check_stage(stage: nn.Module) -> None:
    for i, layer in enumerate(stage.layers):
        sa = layer.attention.attention
        convs = [getattr(getattr(sa, f"convolution_projection_{n}"), "convolution_projection", None)
                 for n in ("query", "key", "value")]
        if not all(isinstance(getattr(c, "convolution", None), nn.Conv2d) for c in convs):
            raise ValueError(f"CvT stage-3 layer {i} does not use depthwise-convolution projections "
                             "(qkv_projection_method 'dw_bn'); ATS supports only those")
        if convs[0].convolution.stride != (1, 1):
            raise ValueError(f"CvT stage-3 layer {i} has query stride {convs[0].convolution.stride}; "
                             "ATS needs stride 1 (one query per token)")


def target(model: nn.Module) -> nn.Module:
    """The module a patch swaps: the CvT encoder."""
    return backbone(model)[0].encoder


def placement(model: nn.Module) -> Tuple[int, Tuple[int, ...]]:
    """Layers of the last stage ATS can go in, and the default ones: 1 to 9 (the paper's
    placement, 0-indexed within the stage; fewer when the stage is shorter)."""
    depth = len(target(model).stages[-1].layers)
    return depth, tuple(range(min(1, depth), min(10, depth)))


def validate(model: nn.Module, blocks, num_tokens, sampler: str, mode: str, scorer: str,
             reducer: str) -> PatchConfig:
    """The config :func:`ats_vit.apply` would install (``blocks`` index the last stage's layers;
    only ``reducer="ats"`` with the ``"cls_value"`` scorer); raises what it would raise."""
    encoder = target(model)
    check_unpatched(encoder)
    config = backbone(model)[0].config
    if not config.cls_token[-1] or any(config.cls_token[:-1]):
        raise ValueError("CvT needs a class token in its last stage, and only there, for ATS")
    _check_stage(encoder.stages[-1])
    checked = checked_config(placement(model), blocks, num_tokens, sampler, mode, scorer, reducer)
    if (reducer, scorer) != ("ats", "cls_value"):
        raise ValueError(f"CvT supports reducer 'ats' with scorer 'cls_value' only, got {reducer!r} "
                         f"with {scorer!r}: its keys are not its tokens")
    return checked


def _layer_cost(layer: nn.Module) -> CvtLayerCost:
    sa = layer.attention.attention
    q_conv = sa.convolution_projection_query.convolution_projection.convolution
    kv_conv = sa.convolution_projection_key.convolution_projection.convolution
    return CvtLayerCost(width=sa.embed_dim, q_conv=ConvCost.of(q_conv), kv_conv=ConvCost.of(kv_conv),
                        q_proj=linear_macs(sa.projection_query),
                        kv_proj=linear_macs(sa.projection_key) + linear_macs(sa.projection_value),
                        proj=linear_macs(layer.attention.output),
                        mlp=linear_macs(layer.intermediate) + linear_macs(layer.output))


def cost_model(model: nn.Module) -> CvtCost:
    """MACs per image of the encoder and the heads (every linear layer outside the backbone);
    bind it to an input size with ``.at(height, width)``."""
    encoder = target(model)
    stages = [CvtStageCost(ConvCost.of(s.embedding.convolution_embeddings.projection), hasattr(s, "cls_token"),
                           [_layer_cost(layer) for layer in s.layers]) for s in encoder.stages]
    return CvtCost(stages, linear_macs(model) - linear_macs(backbone(model)[0]))


def geometry(model: nn.Module, height: int, width: int):
    """(patch tokens of the last stage, prefix tokens, cost model at this size) on a ``height`` x
    ``width`` input."""
    cost = cost_model(model).at(height, width)
    grid = cost.grids()[-1]
    return grid[0] * grid[1], 1, cost


def install_patch(model: nn.Module, config: PatchConfig) -> None:
    encoder = target(model)
    install(encoder, _ATSCvtEncoder, Patch(config, tuple(encoder.stages[-1].layers), cost_model(model),
                                           type(encoder)))


class _ATSCvtEncoder:
    """Methods that replace ``CvtEncoder``'s while ATS is applied: its last stage (the one with
    the class token) runs through :func:`cvt_block`."""

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False, return_dict: bool = True):
        from transformers.models.cvt.modeling_cvt import BaseModelOutputWithCLSToken

        refuse(output_hidden_states=output_hidden_states)
        height, width = pixel_values.shape[-2:]
        hidden = pixel_values
        for stage in self.stages[:-1]:
            hidden, _ = stage(hidden)
        stage = self.stages[-1]
        grid = stage.embedding(hidden)
        B, C, H, W = grid.shape
        x = torch.cat([stage.cls_token.expand(B, -1, -1), grid.flatten(2).transpose(1, 2)], dim=1)
        shape = (H, W)

        def reduce(layer, tokens: Tokens, num_prefix: int, num_tokens: NumTokens, num_patches: int, sampler: str,
                   scorer: str, module=None) -> Tokens:
            k = resolve_k(num_tokens, tokens.layout, num_prefix, num_patches)
            return cvt_block(layer, tokens, shape, (k, get_sampler(sampler)))

        patch = patch_of(self)
        tokens = run_blocks(patch.parts, x, 1, patch, reduce=reduce,
                            dense=lambda layer, tokens: cvt_block(layer, tokens, shape),
                            cost=patch.cost.at(height, width))
        padded = tokens.padded()
        cls = padded[:, :1]
        hidden = grid_of_tokens(padded[:, 1:], tokens.positions, shape)
        if not return_dict:
            return hidden, cls
        return BaseModelOutputWithCLSToken(last_hidden_state=hidden, cls_token_value=cls)
