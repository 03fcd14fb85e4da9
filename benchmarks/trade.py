"""The trade the ATS paper argues, measured on the bundled model: ATS off the shelf (no parameters,
no training), ATS fine-tuned with ATS in place, and DynamicViT trained (its predictors and the
backbone), each at matched GMACs (ATS's budget searched as `ats-vit eval` searches it; DynamicViT's
keep ratio bisected to the same mean GMACs).

Runs whatever is missing under --out (each fine-tune in its own folder, checkpointed every epoch
and resumed from there, so a killed run continues where it stopped), evaluates every model on the
full test set, prints the table (top-1 with its 95% interval and paired difference to ATS off the
shelf, GMACs, extra parameters, training wall time, model img/s and its speed-up over dense timed
in the same evaluation, the figure to compare across rows, since each row's evaluation runs
separately and the machine's speed drifts between them) and writes trade.json.

    python benchmarks/trade.py [--reductions 0.5] [--epochs 2] [--methods ats_ft,dynamicvit] [--out runs/trade]
                               [--limit N]
"""
import argparse
import copy
import json
from pathlib import Path

import torch

from ats_vit.jobs.eval import EvalOptions, run_eval
from ats_vit.jobs.evaluation import Method, budget_for, image_gmacs
from ats_vit.jobs.finetune import FinetuneOptions, run_finetune
from ats_vit.jobs.intervals import difference_interval
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from ats_vit.jobs.report import format_table, machine, write_json
from ats_vit.reducers.dynamicvit import PREDICTORS

DYNAMICVIT_LR = 1e-3  # its predictors' rate; the backbone trains at 0.01 x this


def budgets(reduction: float, calib_images: int = 512) -> dict:
    """ATS's K and DynamicViT's keep ratio for ``reduction`` fewer mean GMACs than dense."""
    model = load_model()
    calib = first_images(load_dataset("fashion-mnist", model), calib_images)
    target = (1 - reduction) * image_gmacs(model, calib)
    ats, ats_gmacs = budget_for(model, Method("", "ATS", tuple(range(3, 12))), calib, target, 256, "ATS")
    dvit, dvit_gmacs = budget_for(copy.deepcopy(model), Method("", "DynamicViT", (3, 6, 9), reducer="dynamicvit"),
                                  calib, target, 256, "DynamicViT")
    return {"target_gmacs": target, "ats_k": ats.num_tokens, "ats_gmacs": ats_gmacs,
            "rho": round(dvit.num_tokens, 4), "dynamicvit_gmacs": dvit_gmacs}


def fine_tune(out: Path, **options) -> dict:
    """A finished fine-tune in ``out`` (run, or resumed, when not finished); its log rows."""
    if not (out / "last.json").exists():
        run_finetune(FinetuneOptions(out=str(out), resume=(out / "run.json").exists(), workers=2, **options))
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def evaluate(out: Path, **options):
    """(dense result, method result) of `ats-vit eval` with ``options``."""
    return run_eval(EvalOptions(out=str(out), workers=2, **options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reductions", default="0.5")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--methods", default="ats_ft,dynamicvit")
    parser.add_argument("--out", default="runs/trade")
    parser.add_argument("--limit", type=int, help="train and test on the first N images (a smoke run)")
    args = parser.parse_args()
    out = Path(args.out)
    methods = args.methods.split(",")
    rows = []
    for r in (float(v) for v in args.reductions.split(",")):
        b = budgets(r)
        print(f"-{r:.0%}: {b}", flush=True)
        dense, shelf = evaluate(out / f"eval-ats-{r}", num_tokens=b["ats_k"], limit=args.limit)
        entries = [("dense", dense, 0, 0.0), (f"ATS off the shelf (K={b['ats_k']})", shelf, 0, 0.0)]
        if "ats_ft" in methods:
            log = fine_tune(out / f"ats-{r}", num_tokens=b["ats_k"], epochs=args.epochs, limit=args.limit)
            _, tuned = evaluate(out / f"eval-ats-ft-{r}", model=str(out / f"ats-{r}" / "last.safetensors"),
                                num_tokens=b["ats_k"], limit=args.limit)
            entries.append((f"ATS fine-tuned {args.epochs} epochs", tuned, 0, sum(x["epoch_seconds"] for x in log)))
        if "dynamicvit" in methods:
            folder = out / f"dynamicvit-{r}"
            log = fine_tune(folder, reducer="dynamicvit", num_tokens=b["rho"], epochs=args.epochs, lr=DYNAMICVIT_LR,
                            limit=args.limit)
            weights = str(folder / "last.safetensors")
            _, trained = evaluate(out / f"eval-dynamicvit-{r}", model=weights, reducer="dynamicvit",
                                  num_tokens=b["rho"], limit=args.limit)
            extra = sum(p.numel() for p in getattr(load_model(weights), PREDICTORS).parameters())
            entries.append((f"DynamicViT trained {args.epochs} epochs (rho={b['rho']})", trained, extra,
                            sum(x["epoch_seconds"] for x in log)))
        for label, result, params, seconds in entries:
            diff = difference_interval(result.hits, shelf.hits)
            speed = next(iter(result.speeds.values()))  # the one timed batch size
            rows.append({"reduction": r, "method": label, "top1": round(result.top1, 2),
                         "top1_diff_vs_ats_off_the_shelf": [round(v, 2) for v in diff],
                         "gmacs": round(result.mean_gmacs, 4), "extra_params": params,
                         "training_seconds": round(seconds), "images_per_s": round(speed.images_per_s),
                         "speedup_vs_dense": round(speed.speedup, 2)})
    rows.sort(key=lambda row: row["reduction"])  # --reductions orders the training, not the table
    show = [{"budget": f"-{r['reduction']:.0%}", "method": r["method"], "top-1": f"{r['top1']:.2f}",
             "vs ATS off the shelf": "{:+.2f} [{:+.2f}, {:+.2f}]".format(*r["top1_diff_vs_ats_off_the_shelf"]),
             "GMACs": f"{r['gmacs']:.4f}", "extra params": r["extra_params"],
             "training": f"{r['training_seconds'] / 60:.0f} min", "img/s": r["images_per_s"],
             "speed-up": f"{r['speedup_vs_dense']:.2f}x"} for r in rows]
    print(format_table(show, list(show[0])))
    write_json(out / "trade.json", {"machine": machine("cpu"), "epochs": args.epochs, "limit": args.limit,
                                    "rows": rows})


if __name__ == "__main__":
    main()
