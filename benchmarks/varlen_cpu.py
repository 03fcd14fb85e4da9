"""Variable-length attention on the CPU, issue 15's item 2: each image's kept queries over its own
entering keys, every image's rows packed flat, by three routes that give the same numbers:

- padded: today's path (:func:`ats_vit.core.block.attend`): pad to the batch's longest, SDPA with
  a key mask, images grouped by key count when that saves work, unpad;
- flex: ``torch.nn.attention.flex_attention`` compiled (inductor's CPU kernel) on the packed rows
  as one sequence, with a document mask (a query sees the keys of its own image), the block mask
  built per call since the counts change with every batch;
- loop: one SDPA call per image on its own rows, in Python (the native kernel's twin,
  :func:`ats_vit.core.block.varlen_attention_reference`).

The counts are ATS's own: the kept and entering counts of every ATS block of the bundled model
(released configuration) on the first test images, and for the DeiT-S shape (6 heads of 64) the
same counts. Times each route on the same inputs in interleaved rounds (median), checks they agree,
prints a table and writes JSON. Then end to end: the ATS model's packed forward (the bundled model
released, DeiT-Ti shape at -37.5% GMACs) with the native kernel against the same forward with
padded attention, in paired rounds.

    python benchmarks/varlen_cpu.py [--batches 8,64] [--rounds 20] [--out runs/varlen]
"""
import argparse
import time
from pathlib import Path
from statistics import median

import timm
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import ats_vit
from ats_vit.core import block, native
from ats_vit.core.block import attend, row_offsets, varlen_attention_reference
from ats_vit.core.tokens import Layout
from ats_vit.jobs.evaluation import Method, budget_for, image_gmacs
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from ats_vit.jobs.report import format_table, machine, write_json

SHAPES = {"bundled": (3, 16), "deit_s": (6, 64)}  # heads, head width


def ats_counts(batch: int) -> list:
    """(entering, kept) token counts (B,) of each ATS block of the bundled model on real images."""
    model = ats_vit.apply(load_model())
    with torch.no_grad():
        model(first_images(load_dataset("fashion-mnist", model), batch))
    kept = ats_vit.last_stats(model).num_kept + model.num_prefix_tokens  # (B, blocks), prefix included
    entering = torch.cat([torch.full((batch, 1), kept.new_tensor(197)), kept[:, :-1]], dim=1)
    return [(entering[:, i], kept[:, i]) for i in range(kept.shape[1])]


def layout_of(counts: torch.Tensor) -> Layout:
    """The packed layout of images holding ``counts`` tokens each."""
    width = int(counts.max())
    valid = torch.arange(width)[None] < counts[:, None]
    start = row_offsets(counts)[:-1]
    index = torch.where(valid, start[:, None] + torch.arange(width)[None], start[:, None])
    return Layout(index, valid if not bool(valid.all()) else None, True)


def padded(q, k, v, q_layout: Layout, k_layout: Layout, scale: float):
    qp, kp, vp = (lay.pad(t).transpose(1, 2) for lay, t in ((q_layout, q), (k_layout, k), (k_layout, v)))
    out = attend(qp, kp, vp, q_layout.valid, k_layout.valid, True, scale)
    return q_layout.unpad(out.transpose(1, 2))


# Static shapes: with dynamic=True inductor's CPU flex template fails to compile in torch 2.14.1
# ("'cur_kvSplitSize1' was not declared"), so the packed lengths are rounded up to whole blocks and
# each length pair compiles once (the warm-up compiles them all: flex's best case).
BLOCK = 128
torch._dynamo.config.recompile_limit = 1024
compiled_flex = torch.compile(flex_attention, dynamic=False)


def _documents(counts: torch.Tensor, filler: int) -> torch.Tensor:
    """The image of each packed row, rounded up to whole blocks with ``filler``."""
    doc = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return F.pad(doc, (0, -len(doc) % BLOCK), value=filler)


def flex(q, k, v, q_counts, k_counts, scale: float):
    q_doc, k_doc = _documents(q_counts, -1), _documents(k_counts, -2)  # filler rows see nothing
    mask = create_block_mask(lambda b, h, i, j: q_doc[i] == k_doc[j], None, None, len(q_doc), len(k_doc),
                             device="cpu")
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, len(doc) - len(t))).transpose(0, 1)[None]
               for t, doc in ((q, q_doc), (k, k_doc), (v, k_doc)))
    out = compiled_flex(q, k, v, block_mask=mask, scale=scale)
    return out[0].transpose(0, 1)[:int(q_counts.sum())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="8,64")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="runs/varlen")
    args = parser.parse_args()
    torch.manual_seed(0)
    assert native.available(), "the native ops did not build"
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        blocks = ats_counts(batch)
        for case, (heads, width) in SHAPES.items():
            scale = width ** -0.5
            inputs = []
            for k_counts, q_counts in blocks:
                q = torch.randn(int(q_counts.sum()), heads, width)
                k, v = (torch.randn(int(k_counts.sum()), heads, width) for _ in range(2))
                inputs.append((q, k, v, q_counts, k_counts, layout_of(q_counts), layout_of(k_counts)))
            routes = {
                "padded": lambda q, k, v, qc, kc, ql, kl: padded(q, k, v, ql, kl, scale),
                "flex": lambda q, k, v, qc, kc, ql, kl: flex(q, k, v, qc, kc, scale),
                "loop": lambda q, k, v, qc, kc, ql, kl: varlen_attention_reference(
                    q, k, v, row_offsets(qc), row_offsets(kc), scale),
                "native": lambda q, k, v, qc, kc, ql, kl: torch.ops.ats_vit.varlen_attention(
                    q, k, v, row_offsets(qc), row_offsets(kc), scale),
            }
            with torch.no_grad():
                want = [routes["loop"](*x) for x in inputs]
                error = {}
                for name, route in routes.items():  # warm-up (compiles flex) and agreement
                    error[name] = max(float((route(*x) - w).abs().max()) for x, w in zip(inputs, want))
                times = {name: [] for name in routes}
                for _ in range(args.rounds):
                    for name, route in routes.items():
                        start = time.perf_counter()
                        for x in inputs:
                            route(*x)
                        times[name].append(time.perf_counter() - start)
            base = median(times["padded"])
            for name in routes:
                rows.append({"case": case, "batch": batch, "route": name,
                             "us_per_block": 1e6 * median(times[name]) / len(inputs),
                             "vs_padded": base / median(times[name]), "max_abs_error": error[name]})
    print(format_table(rows, ["case", "batch", "route", "us_per_block", "vs_padded", "max_abs_error"]))
    whole = [end_to_end(name, batch, args.rounds) for batch in (1, *(int(b) for b in args.batches.split(",")))
             for name in ("bundled", "deit_ti")]
    print(format_table(whole, ["case", "batch", "native_ms", "padded_ms", "speedup"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "varlen_cpu.json", {"rows": rows, "end_to_end": whole, "rounds": args.rounds, **machine("cpu")})


def end_to_end(case: str, batch: int, rounds: int) -> dict:
    """One ATS model's packed forward, native variable-length attention against padded attention
    (the routing switched off), paired rounds; ms from the medians, speed-up the median ratio."""
    if case == "bundled":
        model = ats_vit.apply(load_model())
        x = first_images(load_dataset("fashion-mnist", model), batch)
    else:  # as `ats-vit bench --case deit_ti`: random weights, ATS 3-11 at 37.5% fewer GMACs
        torch.manual_seed(0)
        model, x = timm.create_model("deit_tiny_patch16_224").eval(), torch.randn(batch, 3, 224, 224)
        ats, _ = budget_for(model, Method("", "ATS", tuple(range(3, 12))), x, 0.625 * image_gmacs(model, x), batch, "")
        model = ats_vit.apply(model, **ats.patch_arguments())
    routing, times = block._varlen, {"native": [], "padded": []}
    try:
        with torch.no_grad():
            for r in range(rounds + 3):
                for route in times:
                    block._varlen = routing if route == "native" else (lambda *args: False)
                    start = time.perf_counter()
                    model(x)
                    if r >= 3:
                        times[route].append(time.perf_counter() - start)
    finally:
        block._varlen = routing
    return {"case": case, "batch": batch, "native_ms": 1e3 * median(times["native"]),
            "padded_ms": 1e3 * median(times["padded"]),
            "speedup": median(p / n for n, p in zip(times["native"], times["padded"]))}


if __name__ == "__main__":
    main()
