"""The ``ats-vit`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from . import apply, last_stats, remove
from .report import format_table


def _demo(args: argparse.Namespace) -> int:
    import timm

    torch.manual_seed(args.seed)
    model = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    images = torch.randn(args.batch_size, 3, 224, 224)
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
    print(f"DeiT-S shaped ViT (random weights, seed {args.seed}), {args.batch_size} random images at 224 px.")
    print("Random weights attend almost uniformly, so ATS drops little here: the counts show the mechanics.\n")
    print(format_table(rows, list(rows[0])))
    return 0


def _train(args: argparse.Namespace) -> int:
    import json
    import platform
    import shlex
    import time
    from pathlib import Path

    import timm
    from safetensors.torch import save_file
    from torch.utils.data import Subset

    from .data import fashion_mnist
    from .train import TrainConfig, fit
    from .zoo import FMNIST_MODEL

    out = Path(args.out)
    if (out / "log.csv").exists():
        raise SystemExit(f"ats-vit train: --out {out} already holds a run (log.csv); choose another folder")
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    train_set, test_set = fashion_mnist(True, args.data_root), fashion_mnist(False, args.data_root)
    if args.limit:
        train_set, test_set = Subset(train_set, range(args.limit)), Subset(test_set, range(min(args.limit, 10000)))
    torch.manual_seed(args.seed)
    model = timm.create_model(FMNIST_MODEL, pretrained=False)
    start = time.time()
    history = fit(model, train_set, test_set, config, out, on_epoch=lambda row: print(json.dumps(row), flush=True))
    weights = out / f"{FMNIST_MODEL}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = {
        "model": FMNIST_MODEL, "command": "ats-vit " + shlex.join(args.argv), "seed": args.seed,
        "epochs": args.epochs, "train_images": len(train_set), "test_images": len(test_set),
        "wall_seconds": round(time.time() - start, 1), "test_top1": history[-1]["test_top1"],
        "config": vars(config), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "timm": timm.__version__,
    }
    (out / f"{FMNIST_MODEL}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {weights} (test top-1 {meta['test_top1']:.2f}%)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ats-vit", description="Adaptive Token Sampling for timm Vision Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="patch a DeiT-S shaped model and print tokens kept and GMACs against dense")
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)

    train = sub.add_parser("train", help="train the bundled Fashion-MNIST ViT (seeded, logged, checkpointed)")
    train.add_argument("--epochs", type=int, default=9)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1.5e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default="runs/fmnist")
    train.add_argument("--data-root", default=None, help="where Fashion-MNIST is staged (default ~/.cache/ats-vit/data)")
    train.add_argument("--limit", type=int, default=0, help="train and test on the first N images only")
    train.set_defaults(run=_train)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
