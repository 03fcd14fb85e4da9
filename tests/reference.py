"""Slow, obvious re-statements of the ATS rules (ATS-NOTES section 1), one image at a time.

Written from the rule, not from the library: plain Python lists for the sampling, the full N x N
attention matrix for the block, so they share no code path with ``ats_vit``.
"""
from __future__ import annotations

import math

import timm
import torch


def eligible(scores: list[float]) -> list[int]:
    return [j for j, s in enumerate(scores) if math.isfinite(s) and s > 0]


def slow_its(scores: list[float], k: int) -> list[int]:
    """Inverse transform sampling of one row: grid from the smallest non-zero CDF to 1, nearest."""
    elig = eligible(scores)
    if len(elig) <= 1:
        return elig
    order = sorted(elig, key=lambda j: scores[j])  # stable: ties keep index order
    cdf, acc = [], 0.0
    for j in order:
        acc += scores[j]
        cdf.append(acc)
    low, high = cdf[0], cdf[-1]
    F = [(c - low) / (high - low) for c in cdf]
    y0 = min(f for f in F if f > 0)
    grid = [1.0] if k == 1 else [y0 + (1 - y0) * (i / (k - 1)) for i in range(k)]
    picked = set()
    for g in grid:
        nearest = min(range(len(F)), key=lambda t: (abs(F[t] - g), t))
        picked.add(order[nearest])
    return sorted(picked)


def slow_topk(scores: list[float], k: int) -> list[int]:
    return sorted(sorted(eligible(scores), key=lambda j: (-scores[j], j))[:k])


def slow_scores(attn: torch.Tensor, v: torch.Tensor, prefix: int) -> list[float]:
    """Scores of one image: attn (H, N, N), v (H, N, d)."""
    H, N, _ = attn.shape
    raw = []
    for j in range(prefix, N):
        cls = sum(float(attn[h, 0, j]) for h in range(H))
        raw.append(cls * float(torch.cat([v[h, j] for h in range(H)]).norm()))
    total = sum(raw)
    return [r / total for r in raw]


def make_vit(name: str = "deit_small_patch16_224", sharpen: float = 3.0, seed: int = 0, **kwargs):
    """A random-weight timm ViT in eval mode. Scaling the qkv weights makes attention peaked, as
    in trained models, so that ATS keeps different token counts for different images; LayerScale
    starts near zero at initialisation and would hide the blocks, so it is set to 0.5."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(sharpen)
        for module in model.modules():
            if hasattr(module, "gamma"):
                module.gamma.fill_(0.5)
    return model


def reference_forward(model, image: torch.Tensor, ats_blocks, k, rule=slow_its):
    """Logits and kept original positions per ATS block for one image (1, C, H, W).

    ``model`` is unpatched; ``k`` is K in every ATS block (an int, None for the input's patch count).
    """
    P = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(image)))[0]
    positions = list(range(x.shape[0] - P))
    k = len(positions) if k is None else k
    kept = {}
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        N = x.shape[0]
        H, hd = attn.num_heads, attn.head_dim
        h = blk.norm1(x)
        q, kk, v = attn.qkv(h).reshape(N, 3, H, hd).permute(1, 2, 0, 3)
        q, kk = attn.q_norm(q), attn.k_norm(kk)
        A = torch.softmax((q * attn.scale) @ kk.transpose(-2, -1), dim=-1)
        rows = list(range(N))
        if i in ats_blocks:
            with torch.no_grad():
                scores = slow_scores(A, v, P)
            keep = rule(scores, k)
            rows = list(range(P)) + [P + j for j in keep]
            positions = [positions[j] for j in keep]
            kept[i] = list(positions)
        out = (A[:, rows] @ v).transpose(0, 1).reshape(len(rows), H * hd)
        out = attn.proj(attn.norm(out))
        y = x[rows] + blk.ls1(out)
        x = y + blk.ls2(blk.mlp(blk.norm2(y)))
    logits = model.forward_head(model.norm(x)[None])
    return logits[0], kept
