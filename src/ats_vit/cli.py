"""The ``ats-vit`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

import torch

from . import apply, last_stats, remove
from .distributed import Dist
from .errors import UserError
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
    from .train import TrainConfig, check_run_folder, claim_run_folder, fit
    from .zoo import FMNIST_MODEL

    out = Path(args.out)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    identity = {"job": "train", "limit": args.limit, **vars(config)}
    check_run_folder(out, identity, args.resume)
    train_set, test_set = fashion_mnist(True, args.data_root), fashion_mnist(False, args.data_root)
    if args.limit:
        train_set, test_set = Subset(train_set, range(args.limit)), Subset(test_set, range(min(args.limit, 10000)))
    torch.manual_seed(args.seed)
    model = timm.create_model(FMNIST_MODEL, pretrained=False)
    config.check(torch.device("cpu"), Dist(), len(train_set))
    if not args.resume:
        claim_run_folder(out, identity, Dist())
    start = time.time()
    history = fit(model, train_set, test_set, 10, config, out, torch.device("cpu"), resume=args.resume,
                  on_epoch=lambda row: print(json.dumps(row), flush=True))
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


def _parse_blocks(text: str) -> List[int]:
    """'3-11', '3,5,7' or '3'."""
    blocks: List[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            blocks.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like '3-11' or '3,5,7', got {text!r}") from None
    return blocks


def _parse_budget(text: str):
    """An int, a fraction, or a comma list of them (one per ATS block)."""
    def one(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected an int or a fraction, got {v!r}") from None
    values = [one(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _finetune(args: argparse.Namespace) -> int:
    from .finetune_job import FinetuneOptions, run_finetune

    run_finetune(FinetuneOptions(
        model=args.model, checkpoint=args.checkpoint, data=args.data, blocks=args.blocks,
        num_tokens=args.num_tokens, sampler=args.sampler, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, warmup_epochs=args.warmup_epochs, amp=args.amp, limit=args.limit, workers=args.workers,
        seed=args.seed, device=args.device, out=args.out, resume=args.resume,
        command="ats-vit " + " ".join(args.argv)))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval_job import EvalOptions, run_eval

    run_eval(EvalOptions(
        model=args.model, checkpoint=args.checkpoint, data=args.data, blocks=args.blocks,
        num_tokens=args.num_tokens, sampler=args.sampler, target_gmacs=args.target_gmacs,
        reductions=args.reductions, limit=args.limit, calib_images=args.calib_images,
        batch_size=args.batch_size, workers=args.workers, device=args.device, out=args.out,
        timing_repeats=args.timing_repeats, suite=args.suite, command="ats-vit " + " ".join(args.argv)))
    return 0


def _viz(args: argparse.Namespace) -> int:
    from .viz_job import VizOptions, run_viz

    run_viz(VizOptions(images=args.images, fashion_mnist=args.fashion_mnist, model=args.model,
                       checkpoint=args.checkpoint, blocks=args.blocks, num_tokens=args.num_tokens,
                       sampler=args.sampler, out=args.out))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import BenchOptions, run_bench

    run_bench(BenchOptions(cases=args.case, batch_sizes=args.batch_sizes, dtypes=args.dtypes, compile=args.compile,
                           warmup=args.warmup, repeats=args.repeats, reduction=args.reduction, device=args.device,
                           out=args.out))
    return 0


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments ``eval`` and ``ablate`` share."""
    parser.add_argument("--model", default=None, help="timm model name, a local .safetensors with its metadata "
                                                      "JSON beside it (default: the bundled Fashion-MNIST ViT), or "
                                                      "hf:FOLDER_OR_NAME for a transformers ViT/DeiT/CvT classifier "
                                                      "(needs ats-vit[hf]; evaluated with its own image processor)")
    parser.add_argument("--checkpoint", default=None, help="local weights for --model, loaded by timm")
    parser.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an image folder of class sub-folders")
    parser.add_argument("--reductions", type=lambda t: [float(v) for v in t.split(",")], default=[0.4, 0.5, 0.6],
                        help="GMACs reductions of the matched budgets")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--calib-images", type=int, default=512, help="images used to find budgets")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/eval")


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
    train.add_argument("--resume", action="store_true", help="continue the run saved in --out after its last epoch")
    train.set_defaults(run=_train)

    ft = sub.add_parser("finetune", help="fine-tune a model with ATS in place (alone or under torchrun)",
                        description="Trains with ATS applied (selection deterministic, gradients through the kept "
                                    "tokens); evaluates top-1 and mean GMACs after each epoch; checkpoints every "
                                    "epoch. Runs unchanged under torchrun --nproc_per_node N.")
    ft.add_argument("--model", default=None, help="timm model name, or a local .safetensors with its metadata "
                                                  "JSON beside it (default: the bundled Fashion-MNIST ViT)")
    ft.add_argument("--checkpoint", default=None, help="local weights for --model, loaded by timm")
    ft.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or a folder with train/ and val/ "
                                                            "sub-folders of class folders")
    ft.add_argument("--blocks", type=_parse_blocks, default=None, help="ATS blocks, e.g. 3-11 (default 3..last)")
    ft.add_argument("--num-tokens", type=_parse_budget, default=None, help="K: int, fraction, or one per block")
    ft.add_argument("--sampler", default="inverse_transform")
    ft.add_argument("--epochs", type=int, default=3)
    ft.add_argument("--batch-size", type=int, default=128, help="global batch, split over the processes")
    ft.add_argument("--lr", type=float, default=3e-4)
    ft.add_argument("--warmup-epochs", type=float, default=0.2)
    ft.add_argument("--amp", default="none", help="none, bfloat16 or float16 (CUDA) autocast")
    ft.add_argument("--limit", type=int, default=None, help="train and evaluate on the first N images only")
    ft.add_argument("--workers", type=int, default=2)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ft.add_argument("--out", default="runs/finetune")
    ft.add_argument("--resume", action="store_true", help="continue the run saved in --out after its last epoch")
    ft.set_defaults(run=_finetune)

    ev = sub.add_parser("eval", help="accuracy, per-image GMACs and speed: dense vs ATS vs top-K",
                        description="Without ATS options: the full comparison (dense, ATS released and at "
                                    "lower budgets, top-K and single-block ATS at matched GMACs). With "
                                    "--blocks/--num-tokens/--sampler/--target-gmacs: dense and that configuration.")
    _add_eval_arguments(ev)
    ev.add_argument("--blocks", type=_parse_blocks, default=None, help="ATS blocks, e.g. 3-11 or 3,6,9")
    ev.add_argument("--num-tokens", type=_parse_budget, default=None, help="K: int, fraction, or one per block")
    ev.add_argument("--sampler", default=None, help="inverse_transform (default), topk or random")
    ev.add_argument("--target-gmacs", type=float, default=None, help="find K so the mean GMACs per image hit this")
    ev.set_defaults(run=_eval, suite="default")

    ab = sub.add_parser("ablate", help="the paper's ablations and EViT/ToMe at matched GMACs, one table",
                        description="Every variant (ATS, top-K and random selection; no value norm, all-query "
                                    "attention and random scores; ATS in block 3 alone; EViT; ToMe) at each of "
                                    "--reductions of dense GMACs, budgets found on the calibration images.")
    _add_eval_arguments(ab)
    ab.set_defaults(run=_eval, suite="ablate", out="runs/ablate", blocks=None, num_tokens=None, sampler=None,
                    target_gmacs=None)

    vz = sub.add_parser("viz", help="draw, per image, the patches each ATS block kept")
    vz.add_argument("images", nargs="*", help="image files (PNG, JPEG, any size and mode)")
    vz.add_argument("--fashion-mnist", type=int, default=0, metavar="N", help="also draw the first N test images")
    vz.add_argument("--model", default=None, help="timm model name or weights file (default: bundled model)")
    vz.add_argument("--checkpoint", default=None)
    vz.add_argument("--blocks", type=_parse_blocks, default=None)
    vz.add_argument("--num-tokens", type=_parse_budget, default=None)
    vz.add_argument("--sampler", default="inverse_transform")
    vz.add_argument("--out", default="runs/viz")
    vz.set_defaults(run=_viz)

    bn = sub.add_parser("bench", help="model-only throughput: dense vs ATS packed vs ATS padded, realisation ratio")
    bn.add_argument("--case", type=lambda t: t.split(","), default=["deit_s", "bundled"],
                    help="deit_s (DeiT-S shape at 224, random weights), bundled (Fashion-MNIST ViT, real images), "
                         "cvt13 (transformers CvT-13 at 224, random weights, ATS at the paper's -29%%; needs "
                         "ats-vit[hf])")
    bn.add_argument("--batch-sizes", type=lambda t: [int(v) for v in t.split(",")], default=[1, 8, 64])
    bn.add_argument("--dtypes", type=lambda t: t.split(","), default=["float32", "bfloat16"])
    bn.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    bn.add_argument("--warmup", type=int, default=3)
    bn.add_argument("--repeats", type=int, default=10)
    bn.add_argument("--reduction", type=float, default=0.375, help="GMACs reduction of the deit_s ATS budget")
    bn.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bn.add_argument("--out", default="runs/bench")
    bn.set_defaults(run=_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except UserError as e:
        # Errors raised in a data-loader worker come back with its traceback folded into the message.
        message = str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"ats-vit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
