"""The ``ats-vit demo`` command: patch a DeiT-S shaped model and print the tokens each ATS block
kept and the GMACs against dense."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hosts import apply, last_stats, remove
from .options import BATCH_SIZE, SEED, check_options
from .report import format_table


@dataclass
class DemoOptions:
    batch_size: int = BATCH_SIZE(8)
    seed: int = SEED(0)
    command: str = ""


def run_demo(options: DemoOptions) -> list:
    """Print one row per configuration; returns the rows."""
    import timm

    check_options(options)
    torch.manual_seed(options.seed)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    images = torch.randn(options.batch_size, 3, 224, 224)
    configs = [
        ("released: blocks 3-11, K=196", dict()),
        ("blocks 3-11, K=0.8 of entering", dict(num_tokens=0.8)),
        ("blocks 3-11, K=0.6 of entering, top-K", dict(num_tokens=0.6, sampler="topk")),
    ]
    rows = []
    for label, kwargs in configs:
        apply(model, **kwargs)
        with torch.no_grad():
            model(images)
        stats = last_stats(model)
        rows.append({
            "configuration": label,
            "tokens kept per ATS block (mean)": " ".join(f"{v:.0f}" for v in stats.num_kept.double().mean(0).tolist()),
            "GMACs/image": float(stats.gmacs.mean()),
            "dense GMACs": stats.dense_gmacs,
            "reduction": f"{float(stats.reduction.mean()):.1%}",
        })
        remove(model)
    print(f"DeiT-S shaped ViT (random weights, seed {options.seed}), {options.batch_size} random images at 224 px.")
    print("Random weights attend almost uniformly, so ATS drops little here: the counts show the mechanics.\n")
    print(format_table(rows, list(rows[0])))
    return rows


COMMAND = dict(name="demo", options=DemoOptions, run=run_demo,
               help="patch a DeiT-S shaped model and print tokens kept and GMACs against dense")
