"""Slow per-image statements of ATS in transformers ViT/DeiT and CvT models, written from the rules
with the models' own submodules and Python loops, sharing no code path with ``ats_vit``."""
from __future__ import annotations

import torch
from transformers import (CvtConfig, CvtForImageClassification, DeiTConfig, DeiTForImageClassification,
                          DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification)

from reference import slow_its, slow_scores


def _sharpen(linears, factor: float) -> None:
    """Scaled query/key weights make random-init attention peaked, as in trained models, so that
    images keep different token counts."""
    with torch.no_grad():
        for linear in linears:
            linear.weight.mul_(factor)


def make_hf(kind: str, seed: int = 0, sharpen: float = 0.0):
    """A small random-initialised transformers model in eval mode: "vit", "deit", "deit_teacher"
    (32 px, 4 px patches: 64 patch tokens) or "cvt" (96 px: a 6 x 6 last-stage grid). ``sharpen``
    scales the query and key weights (0: 3 for CvT, 10 for the others, whose initialisation is
    smaller)."""
    torch.manual_seed(seed)
    sharpen = sharpen or (3.0 if kind == "cvt" else 10.0)
    if kind == "cvt":
        model = CvtForImageClassification(CvtConfig(num_labels=5, embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
                                                    depth=[1, 2, 4])).eval()
        _sharpen([layer.attention.attention.projection_query for layer in model.cvt.encoder.stages[-1].layers]
                 + [layer.attention.attention.projection_key for layer in model.cvt.encoder.stages[-1].layers],
                 sharpen)
        return model
    config_cls, model_cls = {"vit": (ViTConfig, ViTForImageClassification),
                             "deit": (DeiTConfig, DeiTForImageClassification),
                             "deit_teacher": (DeiTConfig, DeiTForImageClassificationWithTeacher)}[kind]
    config = config_cls(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=4, num_attention_heads=3,
                        intermediate_size=96, num_labels=5)
    model = model_cls(config).eval()
    backbone = model.vit if kind == "vit" else model.deit
    _sharpen([layer.attention.q_proj for layer in backbone.layers]
             + [layer.attention.k_proj for layer in backbone.layers], sharpen)
    return model


def image_size(kind: str) -> int:
    return 96 if kind == "cvt" else 32


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(x.shape[0], heads, -1).transpose(0, 1)  # (H, N, d)


def reference_vit_forward(model, image: torch.Tensor, ats_blocks, k):
    """Logits and kept positions per ATS layer of a transformers ViT/DeiT classifier, one image."""
    backbone = model.vit if hasattr(model, "vit") else model.deit
    P = 2 if hasattr(backbone.embeddings, "distillation_token") else 1
    x = backbone.embeddings(image)[0]
    positions = list(range(x.shape[0] - P))
    k = len(positions) if k is None else k
    kept = {}
    for i, layer in enumerate(backbone.layers):
        attn = layer.attention
        H = attn.num_attention_heads
        h = layer.layernorm_before(x)
        q, kk, v = (_split_heads(proj(h), H) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        A = torch.softmax(q @ kk.transpose(-2, -1) * attn.scaling, dim=-1)
        rows = list(range(x.shape[0]))
        if i in ats_blocks:
            keep = slow_its(slow_scores(A, v, P), k)
            rows = list(range(P)) + [P + j for j in keep]
            positions = [positions[j] for j in keep]
            kept[i] = list(positions)
        out = attn.o_proj((A[:, rows] @ v).transpose(0, 1).reshape(len(rows), -1))
        y = x[rows] + out
        x = y + layer.mlp(layer.layernorm_after(y))
    x = backbone.layernorm(x)
    if hasattr(model, "cls_classifier"):
        return (model.cls_classifier(x[0]) + model.distillation_classifier(x[1])) / 2, kept
    return model.classifier(x[0]), kept


def _conv_grid(size: int, conv, dim: int) -> int:
    return (size + 2 * conv.padding[dim] - conv.kernel_size[dim]) // conv.stride[dim] + 1


def reference_cvt_forward(model, image: torch.Tensor, ats_blocks, k):
    """Logits and kept positions per ATS layer of a transformers CvT classifier, one image: kept
    tokens on the last stage's grid with zeros elsewhere for the convolutions, keys whose window
    holds no kept token left out, a token scored by the key cell it lies in."""
    encoder = model.cvt.encoder
    hidden = image
    for stage in encoder.stages[:-1]:
        hidden, _ = stage(hidden)
    stage = encoder.stages[-1]
    grid = stage.embedding(hidden)[0]
    C, H, W = grid.shape
    x = torch.cat([stage.cls_token[0], grid.flatten(1).T])
    positions = list(range(H * W))
    k = len(positions) if k is None else k
    kept = {}
    for i, layer in enumerate(stage.layers):
        sa = layer.attention.attention
        heads = sa.num_heads
        h = layer.layernorm_before(x)
        canvas = torch.zeros(1, C, H, W, dtype=x.dtype)
        for t, p in enumerate(positions):
            canvas[0, :, p // W, p % W] = h[1 + t]
        conv = sa.convolution_projection_key.convolution_projection.convolution
        s, pad, ks = conv.stride[0], conv.padding[0], conv.kernel_size[0]
        Hk, Wk = _conv_grid(H, conv, 0), _conv_grid(W, conv, 1)
        here = {(p // W, p % W) for p in positions}
        cells = [(r, c) for r in range(Hk) for c in range(Wk)]
        occupied = [any((r * s - pad + a, c * s - pad + b) in here for a in range(ks) for b in range(ks))
                    for r, c in cells]
        keys = [0] + [1 + j for j, o in enumerate(occupied) if o]
        qg = sa.convolution_projection_query(canvas)[0]
        kin = torch.cat([h[:1], sa.convolution_projection_key(canvas)[0]])
        vin = torch.cat([h[:1], sa.convolution_projection_value(canvas)[0]])
        q = _split_heads(sa.projection_query(torch.cat([h[:1], qg[positions]])), heads)
        kk = _split_heads(sa.projection_key(kin)[keys], heads)
        v = _split_heads(sa.projection_value(vin)[keys], heads)
        A = torch.softmax(q @ kk.transpose(-2, -1) * sa.scale, dim=-1)
        rows = list(range(x.shape[0]))
        if i in ats_blocks:
            key_score = {}
            for col, key in enumerate(keys[1:], start=1):
                attention = sum(float(A[hd, 0, col]) for hd in range(heads))
                key_score[key - 1] = attention * float(torch.cat([v[hd, col] for hd in range(heads)]).norm())
            scores = []
            for p in positions:
                cell = min(p // W // s, Hk - 1) * Wk + min(p % W // s, Wk - 1)
                scores.append(key_score.get(cell, 0.0))
            keep = slow_its([sc / sum(scores) for sc in scores], k)
            rows = [0] + [1 + j for j in keep]
            positions = [positions[j] for j in keep]
            kept[i] = list(positions)
        out = layer.attention.output.dense((A[:, rows] @ v).transpose(0, 1).reshape(len(rows), -1))
        y = x[rows] + out
        x = y + layer.output.dense(layer.intermediate(layer.layernorm_after(y)))
    return model.classifier(model.layernorm(x[:1])[0]), kept
