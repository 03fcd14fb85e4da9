"""The ``ats-vit bench`` command: model-only throughput of dense against ATS (packed and padded)
and the rivals top-K and ToMe at ATS's GMACs, and how much of the ideal speed-up (dense GMACs over
a method's GMACs) turns into wall-clock time: the realisation ratio."""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..core.block import SELECT_RANGE
from ..hosts import cost_model, default_blocks, last_stats
from .errors import UserError
from .evaluation import DENSE, Method, budget_for, configured_copies, image_gmacs, mean_gmacs, refusal
from .options import DEFAULT_DEVICE, DEVICE, OUT, Option, at_least, check_options, comma_list, one_of
from .report import format_table, machine, write_json
from .timing import Speed, compare_throughput, peak_forward_bytes, range_share

BOUND_LABEL = "bound: dense blocks at ATS's counts"

CASES = ("deit_s", "deit_ti", "deit_b", "bundled", "cvt13")
DEFAULT_CASES = ("deit_s", "deit_ti", "bundled")
SHAPES = {"deit_s": "deit_small_patch16_224", "deit_ti": "deit_tiny_patch16_224", "deit_b": "deit_base_patch16_224"}
RIVALS = {"topk": dict(family="top-K", sampler="topk"), "tome": dict(family="ToMe", reducer="tome")}
CVT_REDUCTION = 1 - 3.2 / 4.5  # the paper's CvT-13 budget: 4.5 -> 3.2 GFLOPs
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


CASE = Option("--case", comma_list(str), "deit_s, deit_ti, deit_b (DeiT-S, -Ti, -B shape at 224, random weights, ATS "
              "in blocks 3-11 at --reduction), bundled (Fashion-MNIST "
              "ViT, real images), cvt13 (transformers CvT-13 at 224, random weights, ATS at the paper's -29%%; "
              "needs ats-vit[hf])", check=one_of(lambda: list(CASES)))
BATCH_SIZES = Option("--batch-sizes", comma_list(int), check=at_least(1))
DTYPE_NAMES = Option("--dtypes", comma_list(str), check=one_of(lambda: list(DTYPES)))
COMPILE = Option("--compile", help="time torch.compile'd models", switch=True)
WARMUP = Option("--warmup", int, check=at_least(1))
REPEATS = Option("--repeats", int, "timed rounds (>= 10 for a median worth reporting)", check=at_least(10))
RIVAL_NAMES = Option("--rivals", comma_list(str), "reducers timed at ATS's GMACs beside it: topk, tome, or none",
                     check=lambda v: None if v == ["none"] or set(v) <= set(RIVALS)
                     else f"must be 'none' or some of {list(RIVALS)}")
REDUCTION = Option("--reduction", float, "GMACs reduction of the DeiT-shape cases' ATS budget",
                   check=lambda v: None if 0 < v < 1 else "must be a GMACs reduction in (0, 1)")


@dataclass
class BenchOptions:
    cases: List[str] = CASE(list(DEFAULT_CASES))
    batch_sizes: List[int] = BATCH_SIZES([1, 8, 64])
    dtypes: List[str] = DTYPE_NAMES(["float32", "bfloat16"])
    compile: bool = COMPILE(False)
    rivals: List[str] = RIVAL_NAMES(list(RIVALS))
    warmup: int = WARMUP(3)
    repeats: int = REPEATS(10)
    reduction: float = REDUCTION(0.375)
    device: str = DEVICE(DEFAULT_DEVICE)
    out: str = OUT("runs/bench")
    seed: int = 0
    command: str = ""


def _case(name: str, options: BenchOptions, device: torch.device):
    """(model, input pool, ATS methods) of a benchmark case."""
    import timm

    if name in SHAPES:
        torch.manual_seed(options.seed)
        model = timm.create_model(SHAPES[name]).eval().to(device)
        pool = torch.randn(max(options.batch_sizes), 3, 224, 224, device=device)
        ats = Method("ATS 3-11", "ATS", tuple(range(3, 12)))
        ats, _ = budget_for(model, ats, pool, (1 - options.reduction) * image_gmacs(model, pool),
                            max(options.batch_sizes), f"ATS 3-11 -{options.reduction:.1%}")
        return model, pool, ats
    if name == "bundled":
        from .loading import first_images, load_dataset, load_model

        model = load_model().to(device)
        pool = first_images(load_dataset("fashion-mnist", model), max(options.batch_sizes)).to(device)
        return model, pool, Method("ATS 3-11 released (K=196)", "ATS", tuple(range(3, 12)))
    if name == "cvt13":  # transformers' CvT-13 (random weights), ATS in its last stage's layers 1-9
        try:
            from transformers import CvtConfig, CvtForImageClassification
        except ImportError:
            raise UserError("--case cvt13 needs transformers: pip install 'ats-vit[hf]'") from None
        torch.manual_seed(options.seed)
        model = CvtForImageClassification(CvtConfig()).eval().to(device)
        pool = torch.randn(max(options.batch_sizes), 3, 224, 224, device=device)
        ats = Method("ATS s3 1-9", "ATS", default_blocks(model))
        ats, _ = budget_for(model, ats, pool, (1 - CVT_REDUCTION) * image_gmacs(model, pool),
                            max(options.batch_sizes), f"ATS s3 1-9 -{CVT_REDUCTION:.1%}")
        return model, pool, ats
    raise ValueError(f"unknown case {name!r}")


def _measure(model: nn.Module, methods: Sequence[Method], batch: torch.Tensor, dtype: Optional[torch.dtype],
             options: BenchOptions) -> List[Dict]:
    """One row per method, timed in interleaved rounds on copies of ``model``; the first method is
    the baseline of the speed-ups, each the median of the rounds' paired time ratios. ``methods``
    are dense, ATS packed, ATS padded, then any rivals; a ViT adds the bound at ATS's counts."""
    autocast = torch.autocast(batch.device.type, dtype=dtype) if dtype is not None else nullcontext()
    with configured_copies(model, methods) as models, autocast:
        bound = None
        if isinstance(model, VisionTransformer):
            with torch.no_grad():
                models[1](batch)
            bound = TokenCountBound(models[0], last_stats(models[1]).tokens)
        runners = [torch.compile(m) if options.compile else m for m in models + ([bound] if bound else [])]
        speeds = compare_throughput(runners, batch, options.warmup, options.repeats)
        rows = []
        for method, net, speed in zip(methods, models, speeds):
            if method.blocks is None:
                gmacs, tokens, select = image_gmacs(net, batch), [], 0.0
            else:
                stats = last_stats(net)
                gmacs = float(stats.gmacs.mean())
                tokens = [round(float(t), 1) for t in stats.num_kept.double().mean(0)]
                select = range_share(net, batch, SELECT_RANGE)
            rows.append(_row(method.label, net, batch, speed, gmacs, tokens, select, options))
        if bound is not None:
            kept = [float(bound.counts[i + 1] - model.num_prefix_tokens) for i in methods[1].blocks]
            rows.append(_row(BOUND_LABEL, bound, batch, speeds[-1], bound.gmacs(), kept, 0.0, options))
    for row in rows:
        row["ideal_speedup"] = rows[0]["gmacs"] / row["gmacs"]
        row["realisation"] = row["speedup"] / row["ideal_speedup"]
    if bound is not None:  # how much of what the kernels allow at ATS's counts ATS gets
        for row in rows[1:3]:  # ATS packed and padded
            row["of_bound"] = row["realisation"] / rows[-1]["realisation"]
    return rows


def _row(label: str, net, batch: torch.Tensor, speed: Speed, gmacs: float, tokens: List[float], select: float,
         options: BenchOptions) -> Dict:
    return {"method": label, "images_per_s": speed.images_per_s, "latency_ms": speed.median_ms,
            "latency_p90_ms": speed.p90_ms, "peak_mb": peak_forward_bytes(net, batch) / 2 ** 20, "gmacs": gmacs,
            "tokens_per_ats_block": tokens, "selection_share": select, "runs": options.repeats,
            "speedup": speed.speedup}


class _FirstTokens(nn.Module):
    """A block run on the first ``count`` tokens of its input."""

    def __init__(self, block: nn.Module, count: int):
        super().__init__()
        self.block, self.count = block, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x[:, :self.count])


class TokenCountBound(nn.Module):
    """The dense timm model, run by timm's own forward, with each block simply run on as many
    tokens as ATS kept there (the batch's mean count, rounded, for every image; the first tokens,
    not the selected ones), with no scoring, sampling, padding or packing: the speed-up this
    machine's kernels allow at ATS's token counts, a bound for any implementation of the selection."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor):
        super().__init__()
        self.counts = [int(c) for c in tokens.double().mean(0).round()]  # entering each block, then leaving the last
        self.num_prefix = model.num_prefix_tokens
        self.cost = cost_model(model)
        # A copy of the model that shares its blocks (deepcopy's memo maps each to itself).
        self.model = copy.deepcopy(model, memo={id(b): b for b in model.blocks})
        self.model.blocks = nn.Sequential(*[_FirstTokens(b, c) for b, c in zip(model.blocks, self.counts[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def gmacs(self) -> float:
        """GMACs per image: each block dense at the count it holds."""
        per_block = torch.tensor([self.counts[1:] + self.counts[-1:]])
        prefix = self.num_prefix
        return float(self.cost.macs(self.counts[0] - prefix, per_block, (), "dense", prefix)[0]) / 1e9


def run_bench(options: BenchOptions) -> List[Dict]:
    """Measure every case, batch size, dtype and method; print a table and write JSON."""
    check_options(options)
    device = torch.device(options.device)
    rows = []
    for case in options.cases:
        model, pool, ats = _case(case, options, device)
        methods = [DENSE, replace(ats, label=f"{ats.label} packed", mode="packed"),
                   replace(ats, label=f"{ats.label} padded", mode="padded"), *_rivals(model, ats, pool, options)]
        for dtype in options.dtypes:
            for bs in options.batch_sizes:
                for row in _measure(model, methods, pool[:bs], DTYPES[dtype], options):
                    rows.append({"case": case, "dtype": dtype, "batch": bs, **row})
                    print(f"{case} {dtype} batch {bs} {row['method']}: {row['images_per_s']:.1f} img/s, "
                          f"speed-up {row['speedup']:.2f} of ideal {row['ideal_speedup']:.2f}", flush=True)
    _report(rows, options)
    return rows


def _rivals(model: nn.Module, ats: Method, pool: torch.Tensor, options: BenchOptions) -> List[Method]:
    """The ``--rivals`` in ATS's blocks, each at the mean GMACs ATS has on the pool (those the
    model cannot run are said and left out)."""
    names = [] if options.rivals == ["none"] else options.rivals
    target = mean_gmacs(model, ats, pool, len(pool))
    span = f"{ats.blocks[0]}-{ats.blocks[-1]}"
    methods = []
    for name in names:
        rival = Method("", f"{RIVALS[name]['family']} {span}", ats.blocks,
                       **{k: v for k, v in RIVALS[name].items() if k != "family"})
        reason = refusal(model, rival)
        if reason:
            print(f"skipping {rival.family}: {reason}", flush=True)
            continue
        methods.append(budget_for(model, rival, pool, target, len(pool), f"{rival.family} at ATS's GMACs")[0])
    return methods


def _report(rows: List[Dict], options: BenchOptions) -> None:
    show = [{"case": r["case"], "dtype": r["dtype"], "batch": r["batch"], "method": r["method"],
             "img/s": f"{r['images_per_s']:.1f}", "ms": f"{r['latency_ms']:.2f}",
             "p90 ms": f"{r['latency_p90_ms']:.2f}",
             "peak MB": f"{r['peak_mb']:.0f}", "GMACs": f"{r['gmacs']:.3f}",
             "tokens/ATS block": " ".join(f"{t:.0f}" for t in r["tokens_per_ats_block"]) or "-",
             "ideal": f"{r['ideal_speedup']:.2f}x", "measured": f"{r['speedup']:.2f}x",
             "realisation": f"{r['realisation']:.2f}",
             "ATS / bound": f"{r['of_bound']:.2f}" if "of_bound" in r else "-",
             "select %": f"{100 * r['selection_share']:.1f}" if r["tokens_per_ats_block"] else "-"} for r in rows]
    print()
    print(format_table(show, list(show[0])))
    setting = {**machine(options.device), "compile": options.compile, "warmup": options.warmup,
               "repeats": options.repeats}
    print(f"\nmodel only; methods timed in turn, {options.repeats} rounds after {options.warmup} warm-up rounds; "
          f"img/s and ms (one forward of the batch) from each method's median time, p90 ms its 90th percentile, "
          f"speed-up the median of the rounds' paired ratios, ATS / bound the realisation over the bound's; "
          f"{setting}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", {"machine": setting, "rows": rows})
    print(f"wrote {out / 'bench.json'}")


COMMAND = dict(name="bench", options=BenchOptions, run=run_bench,
               help="model-only throughput: dense, ATS packed and padded, top-K and ToMe at ATS's GMACs; realisation")
