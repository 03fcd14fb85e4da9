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
        A, _, v = _attention_one(blk, x)
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


def _attention_one(blk, x, size=None):
    """Full attention of one image's tokens x (N, C): probabilities (H, N, N), keys and values
    (H, N, d); ``size`` adds ToMe's log-size bias to each key."""
    attn = blk.attn
    N = x.shape[0]
    h = blk.norm1(x)
    q, kk, v = attn.qkv(h).reshape(N, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, kk = attn.q_norm(q), attn.k_norm(kk)
    logits = (q * attn.scale) @ kk.transpose(-2, -1)
    if size is not None:
        logits = logits + torch.tensor(size, dtype=logits.dtype).log()[None, None, :]
    return torch.softmax(logits, dim=-1), kk, v


def _attend_one(blk, x, size=None):
    """:func:`_attention_one`'s probabilities and keys, and the attention residual y (N, C)."""
    A, kk, v = _attention_one(blk, x, size)
    out = blk.attn.proj(blk.attn.norm((A @ v).transpose(0, 1).reshape(x.shape[0], -1)))
    return A, kk, x + blk.ls1(out)


def reference_rival_forward(model, image: torch.Tensor, blocks, keep_fraction: float, kind: str):
    """EViT or ToMe on one image, written from the papers with Python loops over tokens.

    Returns logits and, per reducing block, the original positions its output patch tokens
    continue (-1: EViT's fused token)."""
    P = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(image)))[0]
    positions = list(range(x.shape[0] - P))
    size = None
    record = {}
    for i, blk in enumerate(model.blocks):
        A, kk, y = _attend_one(blk, x, size)
        if i in blocks:
            n = y.shape[0] - P
            keep = min(n, max(1, round(n * keep_fraction)))
            if kind == "evit" and keep < n:
                cls = [float(A[:, 0, P + j].mean()) for j in range(n)]
                top = sorted(sorted(range(n), key=lambda j: (-cls[j], j))[:keep])
                fused = sum(cls[j] * y[P + j] for j in range(n) if j not in top)
                y = torch.cat([y[:P], y[[P + j for j in top]], fused[None]])
                positions = [positions[j] for j in top] + [-1]
            elif kind == "tome" and n >= 2 and keep < n:
                r = min(n - keep, (n + 1) // 2)
                sizes = size if size is not None else [1.0] * y.shape[0]
                metric = kk.mean(0)[P:]
                metric = metric / metric.norm(dim=-1, keepdim=True)
                A_idx, B_idx = list(range(0, n, 2)), list(range(1, n, 2))
                best = []
                for a in A_idx:
                    sims = [float(metric[a] @ metric[b]) for b in B_idx]
                    m = max(sims)
                    best.append((m, B_idx[sims.index(m)]))
                ranked = sorted(range(len(A_idx)), key=lambda t: -best[t][0])  # stable: ties keep order
                merged = set(ranked[:r])
                tot = {b: sizes[P + b] for b in B_idx}
                acc = {b: sizes[P + b] * y[P + b] for b in B_idx}
                for t in merged:
                    a, b = A_idx[t], best[t][1]
                    tot[b] += sizes[P + a]
                    acc[b] = acc[b] + sizes[P + a] * y[P + a]
                rest = [A_idx[t] for t in range(len(A_idx)) if t not in merged]
                y = torch.cat([y[:P], y[[P + a for a in rest]].reshape(len(rest), -1),
                               torch.stack([acc[b] / tot[b] for b in B_idx])])
                size = list(sizes[:P]) + [sizes[P + a] for a in rest] + [tot[b] for b in B_idx]
                positions = [positions[a] for a in rest] + [positions[b] for b in B_idx]
            record[i] = list(positions)
        x = y + blk.ls2(blk.mlp(blk.norm2(y)))
    x = model.norm(x)
    if size is not None and model.global_pool == "avg":  # merged tokens weigh the patches they hold
        weights = torch.tensor([float(w) for w in size[P:]], dtype=x.dtype)[:, None]
        pooled = (x[P:] * weights).sum(0) / weights.sum()
        return model.head(model.fc_norm(pooled[None]))[0], record
    return model.forward_head(x[None])[0], record
