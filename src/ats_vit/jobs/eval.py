"""The ``ats-vit eval`` command: evaluate a model's methods, print one table, write JSON, CSV and
figures. :mod:`.ablate` runs the same job on the ablation suite."""
from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..hosts import default_blocks
from ..reducers.dynamicvit import PREDICTORS
from .distributed import Dist, barrier, setup, shard
from .errors import UserError
from .evaluation import (DENSE, Method, Result, budget_for, check_method, check_target, configured_copies,
                         default_suite, evaluate_method, image_gmacs)
from .figures import plot_accuracy_vs_gmacs, plot_token_histogram
from .intervals import RESAMPLES, SEED, accuracy_interval, comparison, difference_interval
from .loading import load_dataset, load_model, num_classes, spread_images
from .options import (BATCH_SIZE, BLOCKS, CHECKPOINT, DATA, DEFAULT_DEVICE, DEVICE, LIMIT, MODEL, NUM_TOKENS, OUT,
                      REDUCER, SAMPLER, WORKERS, Option, at_least, check_options, comma_list, fractions)
from .report import format_table, machine, write_json
from .timing import compare_throughput

HF_MODEL = ("timm model name, a local .safetensors with its metadata JSON beside it (default: the bundled "
            "Fashion-MNIST ViT), or hf:FOLDER_OR_NAME for a transformers ViT/DeiT/CvT classifier (needs "
            "ats-vit[hf]; evaluated with its own image processor)")
REDUCTIONS = Option("--reductions", comma_list(float), "GMACs reductions of the matched budgets", check=fractions)
CALIB_IMAGES = Option("--calib-images", int, "images used to find budgets", check=at_least(1))
TIMING_REPEATS = Option("--timing-repeats", int, "timed rounds of every method", check=at_least(1))
TIMING_BATCH_SIZES = Option("--timing-batch-sizes", comma_list(int), "batch sizes the model alone is timed at, "
                            "each over the same images (default: --batch-size)", check=at_least(1))
TARGET_GMACS = Option("--target-gmacs", float, "find K so the mean GMACs per image hit this", check=at_least(0))


@dataclass
class CompareOptions:
    """What ``eval`` and ``ablate`` share."""
    model: Optional[str] = MODEL(help=HF_MODEL)
    checkpoint: Optional[str] = CHECKPOINT()
    data: str = DATA("fashion-mnist")
    reductions: List[float] = REDUCTIONS([0.4, 0.5, 0.6])
    limit: Optional[int] = LIMIT()
    calib_images: int = CALIB_IMAGES(512)
    batch_size: int = BATCH_SIZE(256)
    workers: int = WORKERS(2)
    device: str = DEVICE(DEFAULT_DEVICE)
    timing_repeats: int = TIMING_REPEATS(5)
    timing_batch_sizes: Optional[List[int]] = TIMING_BATCH_SIZES()
    out: str = OUT("runs/eval")
    command: str = ""


@dataclass
class EvalOptions(CompareOptions):
    blocks: Optional[Sequence[int]] = BLOCKS()
    num_tokens: object = NUM_TOKENS()
    sampler: Optional[str] = SAMPLER()
    reducer: Optional[str] = REDUCER()
    target_gmacs: Optional[float] = TARGET_GMACS()

    @property
    def custom(self) -> bool:
        return any(v is not None for v in (self.blocks, self.num_tokens, self.sampler, self.reducer,
                                           self.target_gmacs))


Suite = Callable[..., List[Method]]


def _methods(model, options: EvalOptions, suite: Suite, calib: torch.Tensor, d: Dist) -> List[Method]:
    say = lambda s: print(f"[calibrating on {len(calib)} images] {s}", flush=True) if d.main else None
    if not options.custom:
        return suite(model, calib, options.batch_size, options.reductions, progress=say)
    reducer = options.reducer or "ats"
    if reducer == "dynamicvit" and getattr(model, PREDICTORS, None) is None:  # fresh predictors would guess
        raise UserError("--reducer dynamicvit needs a model with trained predictors: a checkpoint from "
                        "`ats-vit finetune --reducer dynamicvit`")
    blocks = tuple(options.blocks) if options.blocks is not None else default_blocks(model, reducer)
    sampler = options.sampler or "inverse_transform"
    name = "DynamicViT" if reducer == "dynamicvit" else "ATS" if sampler == "inverse_transform" else sampler
    label = f"{name} blocks {','.join(map(str, blocks))}"
    method = Method(label, label, blocks, options.num_tokens, sampler, reducer=reducer)
    check_method(model, method)
    if options.target_gmacs is not None:
        check_target(model, method, calib, options.target_gmacs, options.batch_size)
        say(f"finding K for {options.target_gmacs:g} GMACs")
        method, _ = budget_for(model, method, calib, options.target_gmacs, options.batch_size,
                               f"{label} @ {options.target_gmacs:g} GMACs")
    return [DENSE, method]


def run_eval(options: CompareOptions, suite: Suite = default_suite) -> List[Result]:
    """Evaluate and report; returns one result per table row. Without ATS options (``ablate``
    has none) the methods are ``suite``'s.

    Under ``torchrun`` every rank calibrates on the same images (so finds the same budgets) and
    evaluates its shard of the data; results are gathered, and rank 0 times the model alone and
    writes the report."""
    check_options(options)
    if not isinstance(options, EvalOptions):
        options = EvalOptions(**{f.name: getattr(options, f.name) for f in fields(CompareOptions)})
    if options.target_gmacs is not None and options.num_tokens is not None:
        raise UserError("--num-tokens and --target-gmacs exclude each other: the target chooses the tokens")
    torch.manual_seed(0)  # the random-selection and random-score ablations draw from it
    with setup(options.device) as (d, device):
        model = load_model(options.model, options.checkpoint).to(device)
        dataset = load_dataset(options.data, model, options.limit)
        classes = num_classes(dataset)
        loader = DataLoader(shard(dataset, d), batch_size=options.batch_size, num_workers=options.workers)
        calib = spread_images(dataset, options.calib_images).to(device)
        methods = _methods(model, options, suite, calib, d)

        sizes = options.timing_batch_sizes or [options.batch_size]
        timing_images = spread_images(dataset, max(sizes)).to(device)
        results = []
        for method in methods:
            results.append(evaluate_method(model, loader, method, device, classes, d))
            if d.main:
                print(f"  {method.label}: top-1 {results[-1].top1:.2f}%  {results[-1].mean_gmacs:.4f} GMACs", flush=True)
        if d.main:
            with configured_copies(model, methods) as models:
                for size in sizes:
                    print(f"  timing every method at batch {size}", flush=True)
                    speeds = compare_throughput(models, timing_images, repeats=options.timing_repeats, batch_size=size)
                    for result, speed in zip(results, speeds):
                        result.speeds[size] = speed
            _report(model, options, dataset, results, timing_images, sizes, d)
        barrier(d)  # the others wait while rank 0 times and writes
    return results


def _rows(results: List[Result], dense: float) -> List[dict]:
    by_label = {r.method.label: r for r in results}
    reference_predictions = by_label[DENSE.label].predictions
    rows = []
    for r in results:
        kept = r.num_kept.mean(axis=0) if r.num_kept is not None else None
        low, high = accuracy_interval(r.hits)
        agree = r.predictions == reference_predictions
        reference = None if r.method.blocks is None else (r.method.reference or DENSE.label)
        rows.append({
            "method": r.method.label,
            "family": r.method.family,
            "blocks": list(r.method.blocks) if r.method.blocks else [],
            "num_tokens": r.method.num_tokens,
            "reducer": r.method.reducer if r.method.blocks else "",
            "sampler": r.method.sampler if r.method.blocks and r.method.reducer == "ats" else "",
            "scorer": r.method.scorer if r.method.blocks and r.method.reducer == "ats" else "",
            "target_gmacs": r.method.target_gmacs,
            "top1": round(r.top1, 2),
            "top1_low": round(low, 2),
            "top1_high": round(high, 2),
            "top5": None if r.top5 is None else round(r.top5, 2),
            "agreement": round(100.0 * float(agree.mean()), 2),
            **dict(zip(("agreement_low", "agreement_high"), (round(v, 2) for v in accuracy_interval(agree)))),
            "vs": reference or "",
            **_difference(r, by_label.get(reference), ""),
            **_difference(r, by_label[DENSE.label] if reference not in (None, DENSE.label) else None, "_dense"),
            "gmacs": round(r.mean_gmacs, 5),
            "reduction_pct": round(100 * (1 - r.mean_gmacs / dense), 1),
            "tokens_per_ats_block": [] if kept is None else [round(float(k), 1) for k in kept],
            "speed": {str(size): {"images_per_s": round(s.images_per_s, 1), "speedup": round(s.speedup, 3),
                                  "median_ms": round(s.median_ms, 2), "p90_ms": round(s.p90_ms, 2)}
                      for size, s in r.speeds.items()},
            "end_to_end_images_per_s": round(len(r.gmacs) / r.seconds, 1),
        })
    return rows


def _difference(result: Result, reference: Optional[Result], suffix: str) -> dict:
    """The paired top-1 difference of ``result`` over ``reference`` with its interval and verdict
    (keys end in ``suffix``); None values without a reference."""
    keys = [k + suffix for k in ("top1_diff", "top1_diff_low", "top1_diff_high", "verdict")]
    if reference is None:
        return dict.fromkeys(keys)
    diff = difference_interval(result.hits, reference.hits)
    return dict(zip(keys, [*(round(v, 2) for v in diff), comparison(*diff[1:])]))


def _show_difference(row: dict, suffix: str, against: str) -> str:
    if row["top1_diff" + suffix] is None:
        return "-"
    return (f"{row['top1_diff' + suffix]:+.2f} [{row['top1_diff_low' + suffix]:+.2f}, "
            f"{row['top1_diff_high' + suffix]:+.2f}] {row['verdict' + suffix]}{against}")


def table_view(rows: List[dict]) -> List[dict]:
    """The rows as the printed table's cells (also what the README's tables show)."""
    return [{
        "method": r["method"], "top-1": f"{r['top1']:.2f}", "95% CI": f"{r['top1_low']:.1f}-{r['top1_high']:.1f}",
        **({"top-5": f"{r['top5']:.2f}"} if r["top5"] is not None else {}),
        "agreement with dense": f"{r['agreement']:.1f} ({r['agreement_low']:.1f}-{r['agreement_high']:.1f})",
        "top-1 vs": _show_difference(r, "", f" vs {r['vs']}" if r["vs"] else ""),
        "top-1 vs dense": _show_difference(r, "_dense", "") if r["vs"] != DENSE.label else _show_difference(r, "", ""),
        "GMACs": f"{r['gmacs']:.4f}", "reduction": f"{r['reduction_pct']:.1f}%",
        "tokens per ATS block": " ".join(f"{k:.0f}" for k in r["tokens_per_ats_block"]) or "-",
        **{f"speed-up b{size}": f"{s['speedup']:.2f}x" for size, s in r["speed"].items()},
        **{f"img/s b{size}": f"{s['images_per_s']:.0f}" for size, s in r["speed"].items()},
        "img/s (end-to-end)": f"{r['end_to_end_images_per_s']:.0f}",
    } for r in rows]


def _report(model, options: EvalOptions, dataset, results: List[Result], timing_images: torch.Tensor,
            sizes: List[int], d: Dist) -> None:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = image_gmacs(model, timing_images)
    rows = _rows(results, dense)
    show = table_view(rows)
    print()
    print(format_table(show, list(show[0])))
    print(f"\n{len(dataset)} images; 95% intervals: percentile bootstrap over the images ({RESAMPLES} resamples, "
          f"seed {SEED}), paired for the top-1 differences (better / worse: the interval excludes zero). Agreement: "
          f"the share of images whose top-1 equals dense's. GMACs measured per image from the tokens kept. img/s "
          f"and speed-up at batch b: the model alone over the same {len(timing_images)} images in forwards of b, "
          f"every method run in turn for {options.timing_repeats} rounds after warm-up (median round; speed-up: "
          f"median of the paired ratios), {options.device}, {torch.get_num_threads()} threads, rank 0 of {d.world} "
          f"process(es); end-to-end includes data loading.")

    meta = {"model": options.model or "vit_fmnist_patch2_28 (bundled)", "checkpoint": options.checkpoint,
            "data": options.data, "images": len(dataset), "calibration_images": options.calib_images,
            "timing_images": len(timing_images), "timing_batch_sizes": sizes,
            "dense_gmacs": dense, **machine(options.device), "processes": d.world, "command": options.command}
    write_json(out / "results.json", {"meta": meta, "rows": rows})
    with open(out / "results.csv", "w", newline="") as f:
        # one column per timed batch size and figure, in place of the nested "speed"
        flat = [{**{k: v for k, v in r.items() if k != "speed"},
                 **{f"{name}_b{size}": value for size, speed in r["speed"].items() for name, value in speed.items()}}
                for r in rows]
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)

    series = {}
    for r in rows:
        series.setdefault(r["family"], []).append((r["gmacs"], r["top1"]))
    plot_accuracy_vs_gmacs(series, out / "accuracy_vs_gmacs.png", title=meta["model"])
    ats = next((r for r in results if r.num_kept is not None and r.method.sampler == "inverse_transform"), None)
    if ats is not None:
        plot_token_histogram(ats.num_kept, ats.method.blocks, out / "tokens_per_block.png",
                             title=f"patch tokens kept per image: {ats.method.label}")
    print(f"wrote {out}/results.json, results.csv, accuracy_vs_gmacs.png"
          + (", tokens_per_block.png" if ats is not None else ""))


COMMAND = dict(
    name="eval", options=EvalOptions, run=run_eval,
    help="accuracy, per-image GMACs and speed: dense vs ATS vs top-K",
    description="Without ATS options: the full comparison (dense, ATS released and at lower budgets, top-K and "
                "single-block ATS at matched GMACs). With --blocks/--num-tokens/--sampler/--target-gmacs: dense "
                "and that configuration.")
