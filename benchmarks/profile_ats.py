"""Where an ATS forward's time goes, op by op: torch.profiler over the bundled model (or a
DeiT-S shape) at one batch size, dense and ATS (released configuration), the top ops by self
CPU time and the share of the selection range (scoring and sampling). Prints tables, writes JSON.

    python benchmarks/profile_ats.py [--case bundled|deit_s] [--batch 1] [--rows 15] [--out runs/profile]
"""
import argparse
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import ats_vit
from ats_vit.core.block import SELECT_RANGE
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from ats_vit.jobs.report import machine, write_json


def case(name: str, batch: int):
    torch.manual_seed(0)
    if name == "bundled":
        model = load_model()
        return model, first_images(load_dataset("fashion-mnist", model), batch)
    return timm.create_model("deit_small_patch16_224").eval(), torch.randn(batch, 3, 224, 224)


def profiled(model, images, steps: int = 50):
    with torch.no_grad():
        for _ in range(10):
            model(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                model(images)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps
    ops = sorted(({"op": e.key, "calls_per_forward": e.count / steps, "self_us_per_forward": e.self_cpu_time_total / steps}
                  for e in events if e.key != SELECT_RANGE), key=lambda r: -r["self_us_per_forward"])
    select = next((e.cpu_time_total / steps for e in events if e.key == SELECT_RANGE), 0.0)
    return {"forward_us": total, "select_us": select, "select_share": select / total, "ops": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="bundled", choices=["bundled", "deit_s"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--out", default="runs/profile")
    args = parser.parse_args()
    model, images = case(args.case, args.batch)
    result = {"dense": profiled(model, images)}
    ats_vit.apply(model)
    result["ats"] = profiled(model, images)
    for name, r in result.items():
        print(f"\n{name}: {r['forward_us']:.0f} us per forward (self CPU time summed), selection range "
              f"{r['select_us']:.0f} us = {100 * r['select_share']:.1f}%")
        print(f"{'op':40s} {'calls':>6s} {'us':>8s}")
        for op in r["ops"][:args.rows]:
            print(f"{op['op'][:40]:40s} {op['calls_per_forward']:6.0f} {op['self_us_per_forward']:8.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"profile_{args.case}_b{args.batch}.json",
               {"case": args.case, "batch": args.batch, **{k: {**v, "ops": v["ops"][:40]} for k, v in result.items()},
                **machine("cpu")})


if __name__ == "__main__":
    main()
