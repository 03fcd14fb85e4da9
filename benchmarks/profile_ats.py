"""Where an ATS forward's time goes, op by op: torch.profiler over the bundled model (or a
DeiT-S shape) at one batch size, dense, ATS (released configuration) and the bench's bound (the
dense blocks run on ATS's mean token counts, ``ats-vit bench``'s "bound" row): the top ops by self
CPU time, the share of the selection range, and the ops where ATS spends more than the bound, the
account of what ATS pays beyond what the kernels need at its counts. Prints tables, writes JSON.
(The profiler records the calling thread: what a native op runs on its other threads shows only
as the op's own time.)

    python benchmarks/profile_ats.py [--case bundled|deit_s] [--batch 1] [--rows 15] [--rounds 5] [--out runs/profile]
"""
import argparse
import copy
import statistics
import time
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import ats_vit
from ats_vit.core.block import SELECT_RANGE
from ats_vit.hosts import last_stats
from ats_vit.jobs.bench import TokenCountBound
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from ats_vit.jobs.report import machine, write_json


def case(name: str, batch: int):
    torch.manual_seed(0)
    if name == "bundled":
        model = load_model()
        return model, first_images(load_dataset("fashion-mnist", model), batch)
    return timm.create_model("deit_small_patch16_224").eval(), torch.randn(batch, 3, 224, 224)


def one_profile(model, images, steps: int) -> dict:
    """Per-op self CPU time (us per forward) of ``steps`` profiled forwards, and the selection range's."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model(images)
    events = prof.key_averages()
    ops = {e.key: (e.count / steps, e.self_cpu_time_total / steps) for e in events if e.key != SELECT_RANGE}
    select = next((e.cpu_time_total / steps for e in events if e.key == SELECT_RANGE), 0.0)
    return {"ops": ops, "select_us": select}


def profiled(models: dict, images, rounds: int, steps: int = 10) -> dict:
    """Each model's profile, the rounds interleaved across models (the machine's speed drifts) and
    every figure the median over rounds: the forward's wall time unprofiled, the self CPU time
    summed over ops, the selection range, and each op's self time."""
    with torch.no_grad():
        for model in models.values():
            for _ in range(3):
                model(images)
        runs = {name: [] for name in models}
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(steps):
                    model(images)
                wall = (time.perf_counter() - start) / steps * 1e6
                runs[name].append({**one_profile(model, images, steps), "wall_us": wall})
    result = {}
    for name, rs in runs.items():
        keys = set().union(*(r["ops"] for r in rs))
        ops = [{"op": k, "calls_per_forward": statistics.median(r["ops"].get(k, (0.0, 0.0))[0] for r in rs),
                "self_us_per_forward": statistics.median(r["ops"].get(k, (0.0, 0.0))[1] for r in rs)} for k in keys]
        total = statistics.median(sum(v[1] for v in r["ops"].values()) for r in rs)
        select = statistics.median(r["select_us"] for r in rs)
        result[name] = {"wall_us": statistics.median(r["wall_us"] for r in rs), "forward_us": total,
                        "select_us": select, "select_share": select / total,
                        "ops": sorted(ops, key=lambda r: -r["self_us_per_forward"])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="bundled", choices=["bundled", "deit_s"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="runs/profile")
    args = parser.parse_args()
    model, images = case(args.case, args.batch)
    ats = ats_vit.apply(copy.deepcopy(model))
    with torch.no_grad():
        ats(images)
    bound = TokenCountBound(model, last_stats(ats).tokens)
    result = profiled({"dense": model, "ats": ats, "bound": bound}, images, args.rounds)
    for name, r in result.items():
        print(f"\n{name}: {r['wall_us']:.0f} us per forward unprofiled, {r['forward_us']:.0f} us self CPU time "
              f"summed under the profiler, selection range "
              f"{r['select_us']:.0f} us = {100 * r['select_share']:.1f}%")
        print(f"{'op':40s} {'calls':>6s} {'us':>8s}")
        for op in r["ops"][:args.rows]:
            print(f"{op['op'][:40]:40s} {op['calls_per_forward']:6.0f} {op['self_us_per_forward']:8.1f}")
    by_op = {name: {op["op"]: op for op in result[name]["ops"]} for name in ("ats", "bound")}

    def spent(name: str, op: str, field: str) -> float:
        return by_op[name].get(op, {}).get(field, 0.0)

    excess = sorted(({"op": op, "calls_ats": spent("ats", op, "calls_per_forward"),
                      "calls_bound": spent("bound", op, "calls_per_forward"),
                      "excess_us": spent("ats", op, "self_us_per_forward") - spent("bound", op, "self_us_per_forward")}
                     for op in by_op["ats"].keys() | by_op["bound"].keys()), key=lambda r: -r["excess_us"])
    print(f"\nATS over the bound: {result['ats']['wall_us'] - result['bound']['wall_us']:+.0f} us per forward "
          f"unprofiled, {result['ats']['forward_us'] - result['bound']['forward_us']:+.0f} us under the profiler")
    print(f"{'op':40s} {'calls ATS':>9s} {'bound':>6s} {'us':>8s}")
    for r in excess[:args.rows]:
        print(f"{r['op'][:40]:40s} {r['calls_ats']:9.0f} {r['calls_bound']:6.0f} {r['excess_us']:+8.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"profile_{args.case}_b{args.batch}.json",
               {"case": args.case, "batch": args.batch, **{k: {**v, "ops": v["ops"][:40]} for k, v in result.items()},
                "ats_over_bound": excess[:40], **machine("cpu")})


if __name__ == "__main__":
    main()
