"""Block kernels: one transformer block (a :class:`~ats_vit.core.parts.BlockParts` record) run on
a :class:`~ats_vit.core.tokens.Tokens` batch, densely or with Adaptive Token Sampling inside its
attention, plus the pieces the rival reducers' blocks share."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.varlen import varlen_attn
from torch.profiler import record_function

from . import native
from .parts import AttentionParts, BlockParts
from .sampling import K, Sampler, inverse_transform_sampling, k_per_row
from .scoring import ScoreFn, class_attention_value_norm
from .tokens import Layout, Tokens, drop_path, select_rows

# Profiler range around the selection (scoring, sampling, the kept rows and layout), so
# benchmarks can time it.
SELECT_RANGE = "ats_vit.select"
# Images per attention call when their token counts differ: packed attention sorts images by
# key count and attends each group of this many at its own padded length, when that cuts the
# padded attention work by more than GROUPING_MIN_SAVING (each call also gathers its rows).
ATTENTION_GROUP = 16
GROUPING_MIN_SAVING = 0.2
# Devices where a packed batch attends through flash attention's variable-length kernel (no
# padding at all); PyTorch 2.14 has it on CUDA only.
VARLEN_DEVICES = ("cuda",)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, dropout_p: float = 0.0,
         fused: bool = True) -> Tensor:
    """Softmax attention (B, H, M, d) with a boolean or additive ``mask``; ``fused`` uses PyTorch's
    scaled-dot-product kernel, else the explicit softmax (as timm's ``fused_attn=False``)."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask if mask.is_floating_point() else logits.masked_fill(~mask, float("-inf"))
    probs = logits.softmax(dim=-1)
    return (F.dropout(probs, dropout_p) if dropout_p else probs) @ v


class _KeepMaskedSoftmax(torch.autograd.Function):
    """DynamicViT's masked softmax over the last axis of attention logits (B, H, N, N): the
    terms ``exp(logit)`` times the keep mask (B, N) off the diagonal (each query keeps itself),
    renormalised. Written out, autograd keeps every intermediate of that chain and its backward
    runs about twice as many full-size passes; this keeps only E = exp(logit) / Z (Z the masked
    sum) and the mask. With A = E * mask and s = sum_j gA * A per query, the gradients are
    A * (gA - s) for the logits and, summed over heads and queries, E * (gA - s) for the mask
    (its diagonal is a constant and gets none)."""

    @staticmethod
    def forward(ctx, logits: Tensor, keep: Tensor) -> Tensor:
        B, N = keep.shape
        mask = keep.to(logits.dtype)[:, None, :].repeat(1, N, 1)
        mask.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        mask = mask[:, None]  # (B, 1, N, N), shared by the heads
        e = (logits - logits.amax(dim=-1, keepdim=True)).exp_()
        probs = e * mask
        z = probs.sum(dim=-1, keepdim=True)
        probs.div_(z)
        ctx.save_for_backward(e.div_(z), mask)
        ctx.keep_dtype = keep.dtype
        return probs

    @staticmethod
    def backward(ctx, grad: Tensor):
        e, mask = ctx.saved_tensors
        probs = e * mask
        shifted = grad - (grad * probs).sum(dim=-1, keepdim=True)
        grad_keep = None
        if ctx.needs_input_grad[1]:
            g = (e * shifted).sum(dim=1)  # (B, N, N): over heads
            grad_keep = (g.sum(dim=1) - g.diagonal(dim1=-2, dim2=-1)).to(ctx.keep_dtype)
        return probs.mul_(shifted), grad_keep


def keep_masked_attention(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float, dropout_p: float = 0.0) -> Tensor:
    """Attention (B, H, N, d) in which each query sees the kept keys and itself: the softmax's
    terms multiplied by ``keep`` (B, N) off the diagonal and renormalised (DynamicViT's training
    mask), so the loss is differentiable in the mask."""
    probs = _KeepMaskedSoftmax.apply((q * scale) @ k.transpose(-2, -1), keep)
    return (F.dropout(probs, dropout_p) if dropout_p else probs) @ v


def attend(q: Tensor, k: Tensor, v: Tensor, q_valid: Optional[Tensor], k_valid: Optional[Tensor], grouped: bool,
           scale: float, dropout_p: float = 0.0, fused: bool = True) -> Tensor:
    """Softmax attention of padded queries (B, H, M, d) over padded keys and values (B, H, N, d).

    ``q_valid`` (B, M) and ``k_valid`` (B, N) mark real rows (None: all real); padding keys are
    never attended and padding query rows are left arbitrary. ``grouped`` attends groups of
    images with similar key counts at their own lengths instead of the whole batch at N.
    """
    mask = None if k_valid is None else k_valid[:, None, None, :]
    B = q.shape[0]
    if mask is None or not grouped or B <= ATTENTION_GROUP:
        return sdpa(q, k, v, mask, scale, dropout_p, fused)
    k_len = k_valid.sum(dim=1)
    q_len = torch.full_like(k_len, q.shape[2]) if q_valid is None else q_valid.sum(dim=1)
    order = k_len.argsort(descending=True)
    groups = order.split(ATTENTION_GROUP)
    sizes = [(int(q_len[ids].max()), int(k_len[ids].max())) for ids in groups]
    work = sum(len(ids) * m * n for ids, (m, n) in zip(groups, sizes))
    if work > (1 - GROUPING_MIN_SAVING) * B * q.shape[2] * k.shape[2]:
        return sdpa(q, k, v, mask, scale, dropout_p, fused)
    out = q.new_zeros(*q.shape[:3], v.shape[-1])
    for ids, (m, n) in zip(groups, sizes):
        out[ids, :, :m] = sdpa(q[ids, :, :m], k[ids, :, :n], v[ids, :, :n], mask[ids, ..., :n], scale, dropout_p,
                               fused)
    return out


def row_offsets(counts: Tensor) -> Tensor:
    """Cumulative row offsets (B + 1,) of images packed flat, each holding ``counts`` (B,) rows."""
    return F.pad(counts.cumsum(0), (1, 0))


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, q_counts: Tensor, k_counts: Tensor, max_q: int, max_k: int,
                     scale: float) -> Tensor:
    """Attention of each image's queries over its own keys, every image packed flat: ``q``
    (Tq, H, d), ``k`` and ``v`` (Tk, H, d), image after image as ``q_counts`` and ``k_counts``
    (B,) say, at most ``max_q`` and ``max_k`` each (known from the layouts' shapes: no host
    read); (Tq, H, d) out. Flash attention's varlen kernel on VARLEN_DEVICES; elsewhere (the CPU)
    the native per-image kernel, or its twin :func:`varlen_attention_reference` without one."""
    cu_q, cu_k = row_offsets(q_counts), row_offsets(k_counts)
    if q.device.type in VARLEN_DEVICES:
        return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, scale=scale)
    if native.available():
        return torch.ops.ats_vit.varlen_attention(q, k, v, cu_q, cu_k, scale)
    return varlen_attention_reference(q, k, v, cu_q, cu_k, scale)


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    """The native ``ats_vit::varlen_attention``'s pure-PyTorch twin, the same bits: SDPA on each
    image's rows (cumulative row offsets ``cu_q``, ``cu_k``, (B + 1,)) viewed as (1, H, n, d)."""
    def rows(t: Tensor, start: int, end: int) -> Tensor:
        return t[start:end].transpose(0, 1)[None]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return torch.cat([F.scaled_dot_product_attention(rows(q, a, b), rows(k, c, e), rows(v, c, e), scale=scale)[0]
                      .transpose(0, 1) for a, b, c, e in zip(cq, cq[1:], ck, ck[1:])])


def _varlen(attn: AttentionParts, layout: Layout, t: Tensor) -> bool:
    """Whether a packed batch attends without padding here, given its queries or projection
    ``t``. Neither kernel has dropout. Flash attention's (VARLEN_DEVICES) takes half precision
    only (autocast gives it); the CPU's has no backward, so it serves inference (1.3-1.9x faster
    than padded attention at batch 8-64, though within noise of it end to end:
    benchmarks/varlen_cpu.py)."""
    if not (layout.packed and attn.fused and attn.dropout_p == 0.0):
        return False
    if t.device.type in VARLEN_DEVICES:
        return t.dtype in (torch.float16, torch.bfloat16)
    return t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled())


def _rows(t: Tensor, layout: Layout) -> Tensor:
    """(B, H, N, d) -> the real tokens' rows (T, H, d) in the layout's flat order."""
    return layout.unpad(t.transpose(1, 2))


def split_heads(attn: AttentionParts, projected: Tensor, layout: Optional[Layout]) -> tuple[Tensor, Tensor, Tensor]:
    """Normed queries, keys and values from the tokens' qkv projection (T, 3C): padded
    (B, H, Nmax, hd) in ``layout``, or row by row (T, H, hd) for ``layout`` None."""
    if layout is None:
        q, k, v = projected.view(projected.shape[0], 3, attn.num_heads, attn.head_dim).unbind(1)
    else:
        B, N = layout.shape
        q, k, v = layout.pad(projected).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.q_norm(q), attn.k_norm(k), v


def qkv(attn: AttentionParts, h: Tensor, layout: Layout) -> tuple[Tensor, Tensor, Tensor]:
    """Normed queries, keys and values (B, H, Nmax, hd) of the normed tokens ``h`` (T, C)."""
    return split_heads(attn, attn.project(h), layout)


def attention_residual(block: BlockParts, x: Tensor, h: Optional[Tensor], out: Tensor, layout: Layout) -> Tensor:
    """From the attention output (T, D): output norm, gate (on the normed input ``h``, needed only
    when the attention has a gate), projection and the residual onto ``x``."""
    attn = block.attn
    out = attn.norm(out)
    if attn.gate is not None:
        out = out * attn.gate(h).sigmoid()
    out = attn.proj_drop(attn.proj(out))
    return x + drop_path(block.drop_path1, block.ls1(out), layout)


def mlp_residual(block: BlockParts, x: Tensor, layout: Layout) -> Tensor:
    return x + drop_path(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), layout)


def _key_mask(tokens: Tokens) -> Optional[Tensor]:
    """The attention mask of a dense block: padding keys hidden, a reducer's key bias added."""
    if tokens.key_bias is None:
        return tokens.layout.key_mask()
    bias = tokens.key_bias if tokens.layout.valid is None else \
        tokens.key_bias.masked_fill(~tokens.layout.valid, float("-inf"))
    return bias[:, None, None, :]


def dense_block(block: BlockParts, tokens: Tokens) -> Tokens:
    """The block on every token; padding keys (and a training keep mask's dropped keys) are
    hidden from its attention."""
    attn, layout = block.attn, tokens.layout
    h = block.norm1(tokens.x)
    projected = attn.project(h)
    padded = layout.valid is not None and tokens.key_bias is None  # padding keys, no bias to add
    if padded and tokens.keep is None and _varlen(attn, layout, projected):  # the packed rows as they are
        counts, longest = layout.counts(), layout.shape[1]
        out = varlen_attention(*split_heads(attn, projected, None), counts, counts, longest, longest,
                               attn.scale).flatten(1)
    else:
        q, k, v = split_heads(attn, projected, layout)
        if tokens.keep is not None:
            out = keep_masked_attention(q, k, v, tokens.keep, attn.scale, attn.dropout_p)
        elif padded and layout.packed:
            out = attend(q, k, v, layout.valid, layout.valid, True, attn.scale, attn.dropout_p, attn.fused)
        else:
            out = sdpa(q, k, v, _key_mask(tokens), attn.scale, attn.dropout_p, attn.fused)
        out = layout.unpad(out.transpose(1, 2).flatten(2))
    y = mlp_residual(block, attention_residual(block, tokens.x, h, out, layout), layout)
    return Tokens(y, layout, tokens.positions, tokens.size, tokens.key_bias, tokens.keep)


def select(q: Tensor, k: Tensor, v: Tensor, tokens: Tokens, num_prefix: int, scale: float, budget: K,
           sampler: Sampler, scorer: ScoreFn) -> tuple[Tensor, Layout, Tensor, Tensor]:
    """One ATS block's selection: ``sampler`` on ``scorer``'s scores of the queries, keys and
    values (B, H, N, d) of ``tokens``, then :func:`~ats_vit.core.tokens.select_rows`.

    Returns:
        the kept tokens' queries (B, H, P + K'max, d) and the rest of ``select_rows``' answer:
        the new layout, the kept rows in the flat tokens and their original positions.
        The paper's pair on the CPU runs as one native op that returns the same, bit for bit
        (see :mod:`ats_vit.core.native`).
    """
    layout = tokens.layout
    if (scorer is class_attention_value_norm and sampler is inverse_transform_sampling
            and q.device.type == "cpu" and native.available()):
        q_kept, kept, flat_rows, positions, valid, index = torch.ops.ats_vit.ats_select(
            q.detach(), k.detach(), v.detach(), layout.valid, scale, num_prefix,
            k_per_row(budget, q.shape[0], q.device), layout.index, tokens.positions, layout.packed)
        new_layout = Layout(index, valid if valid.numel() else None, layout.packed)
        if not q.requires_grad:  # the op's copy carries no gradient; under autograd, gather below
            return q_kept, new_layout, flat_rows, positions
    else:
        index = sampler(scorer(q, k, v, num_prefix, layout.valid, scale), budget)
        kept, new_layout, flat_rows, positions = select_rows(tokens, index, num_prefix)
    q_kept = q.gather(2, kept[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    return q_kept, new_layout, flat_rows, positions


def ats_block(block: BlockParts, tokens: Tokens, num_prefix: int, k: K, sampler: Sampler,
              scorer: ScoreFn = class_attention_value_norm) -> Tokens:
    """The block with Adaptive Token Sampling inside its attention.

    Queries, keys and values are computed for every token entering the block in one projection
    (faster than a separate query projection for the kept tokens). The prefix tokens' attention
    rows give the scores, ``sampler`` picks up to ``k`` patch tokens to keep, and only the prefix
    and kept tokens get attention rows (over all keys, not renormalised), projection, residual and
    MLP. Selection is not differentiated; gradients flow through the kept rows and the values.
    ``scorer`` (see :mod:`ats_vit.core.scoring`) replaces the ATS score for ablations.

    Returns:
        the kept tokens (same layout kind, compacted to the batch's largest count); their
        ``positions`` say which original patches they are.
    """
    attn, layout = block.attn, tokens.layout
    h = block.norm1(tokens.x)
    projected = attn.project(h)
    q, keys, v = split_heads(attn, projected, layout)

    with record_function(SELECT_RANGE):
        q, new_layout, flat_rows, positions = select(q, keys, v, tokens, num_prefix, attn.scale, k, sampler, scorer)
    if (layout.valid is not None or new_layout.valid is not None) and _varlen(attn, layout, q):  # padding to skip
        _, key_rows, value_rows = split_heads(attn, projected, None)  # the packed rows as they are
        out = varlen_attention(_rows(q, new_layout), key_rows, value_rows, new_layout.counts(), layout.counts(),
                               new_layout.shape[1], layout.shape[1], attn.scale).flatten(1)
    else:
        out = attend(q, keys, v, new_layout.valid, layout.valid, layout.packed, attn.scale, attn.dropout_p,
                     attn.fused)
        out = new_layout.unpad(out.transpose(1, 2).flatten(2))
    gate = torch.index_select(h, 0, flat_rows) if attn.gate is not None else None
    x = attention_residual(block, torch.index_select(tokens.x, 0, flat_rows), gate, out, new_layout)
    return Tokens(mlp_residual(block, x, new_layout), new_layout, positions)


def uniform_shape(tokens: Tokens, reducer: str) -> tuple[int, int]:
    """(B, N) of a batch where every image holds the same count; a reducer that needs one says so."""
    if tokens.layout.valid is not None:
        raise ValueError(f"{reducer} blocks need every image to hold the same token count; "
                         "they cannot follow blocks that keep a count per image")
    return tokens.layout.shape


def attend_every_token(block: BlockParts, tokens: Tokens) -> tuple[Tensor, Tensor, Tensor]:
    """The attention residual of every token (B, N, C) of a batch without padding (with its key
    bias, if any); also the normed queries and keys (B, H, N, hd)."""
    attn, (B, N) = block.attn, tokens.layout.shape
    h = block.norm1(tokens.x)
    q, k, v = qkv(attn, h, tokens.layout)
    out = sdpa(q, k, v, _key_mask(tokens), attn.scale, attn.dropout_p, attn.fused).transpose(1, 2).flatten(2)
    y = attention_residual(block, tokens.x, h, out.flatten(0, 1), tokens.layout)
    return y.view(B, N, -1), q, k


def mlp_tokens(block: BlockParts, y: Tensor, like: Tokens, positions: Tensor, size: Optional[Tensor] = None,
               key_bias: Optional[Tensor] = None) -> Tokens:
    """The MLP residual on reduced tokens ``y`` (B, N', C), every image the same count, in the
    layout kind of ``like``."""
    B, N = y.shape[:2]
    layout = Layout.dense(B, N, y.device, like.layout.packed)
    return Tokens(mlp_residual(block, y.flatten(0, 1), layout), layout, positions, size, key_bias)
