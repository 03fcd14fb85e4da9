"""Where ATS's realisation gap goes: dense, ATS, ATS with its sampling replayed from a recording
(no sort or search), top-K at the same mean count for every image (no padding or packing), and
the bound (dense blocks run on ATS's mean counts). One table and JSON per case.

    python benchmarks/realisation_gap.py [--out runs/realisation_gap] [--repeats 15]
"""
import argparse
import copy
import itertools
import json
import platform
from pathlib import Path

import timm
import torch

import ats_vit
from ats_vit.jobs.bench import TokenCountBound
from ats_vit.jobs.evaluation import Method, budget_for, image_gmacs
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from ats_vit.jobs.report import format_table
from ats_vit.core.sampling import inverse_transform_sampling
from ats_vit.jobs.timing import compare_throughput

BLOCKS = list(range(3, 12))


def case_models(name: str):
    """(dense model, batch, ATS num_tokens) of a case."""
    torch.manual_seed(0)
    if name == "bundled":
        model = load_model()
        return model, first_images(load_dataset("fashion-mnist", model), 64), None
    model = timm.create_model("deit_small_patch16_224").eval()
    pool = torch.randn(64, 3, 224, 224)
    ats, _ = budget_for(model, Method("ats", "ats", tuple(BLOCKS)), pool, 0.625 * image_gmacs(model, pool), 64, "ats")
    return model, pool[:1], ats.num_tokens


def run_case(name: str, repeats: int) -> list:
    model, batch, num_tokens = case_models(name)
    ats = ats_vit.apply(copy.deepcopy(model), blocks=BLOCKS, num_tokens=num_tokens)
    recorded = []

    def record(scores, k):
        recorded.append(inverse_transform_sampling(scores, k))
        return recorded[-1]

    ats_vit.register_sampler(f"record_{name}", record)
    with torch.no_grad():
        ats_vit.apply(copy.deepcopy(model), blocks=BLOCKS, num_tokens=num_tokens, sampler=f"record_{name}")(batch)
        ats(batch)
    stats = ats_vit.last_stats(ats)
    replay = itertools.cycle(recorded)
    ats_vit.register_sampler(f"replay_{name}", lambda scores, k: next(replay))
    replayed = ats_vit.apply(copy.deepcopy(model), blocks=BLOCKS, num_tokens=num_tokens, sampler=f"replay_{name}")
    mean_kept = [int(round(float(c))) for c in stats.num_kept.double().mean(0)]
    uniform = ats_vit.apply(copy.deepcopy(model), blocks=BLOCKS, num_tokens=mean_kept, sampler="topk")
    bound = TokenCountBound(model, stats.tokens)
    nets = {"dense": model, "ATS": ats, "ATS, sampling replayed": replayed,
            "top-K, same mean count every image": uniform, "bound: dense blocks at ATS's counts": bound}
    gmacs = {}
    with torch.no_grad():
        for label, net in nets.items():
            net(batch)
            gmacs[label] = (image_gmacs(model, batch) if net is model else bound.gmacs() if net is bound
                            else float(ats_vit.last_stats(net).gmacs.mean()))
        speeds = compare_throughput(list(nets.values()), batch, warmup=3, repeats=repeats)
    rows = []
    for (label, _), (images_per_s, speedup, *_) in zip(nets.items(), speeds):
        ideal = gmacs["dense"] / gmacs[label]
        rows.append({"case": name, "batch": len(batch), "method": label, "images_per_s": images_per_s,
                     "gmacs": gmacs[label], "ideal_speedup": ideal, "speedup": speedup, "realisation": speedup / ideal})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/realisation_gap")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = run_case("deit_s", args.repeats) + run_case("bundled", args.repeats)
    print(format_table([{"case": r["case"], "batch": r["batch"], "method": r["method"],
                         "img/s": f"{r['images_per_s']:.1f}", "GMACs": f"{r['gmacs']:.3f}",
                         "ideal": f"{r['ideal_speedup']:.2f}x", "measured": f"{r['speedup']:.2f}x",
                         "realisation": f"{r['realisation']:.2f}"} for r in rows],
                       ["case", "batch", "method", "img/s", "GMACs", "ideal", "measured", "realisation"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "repeats": args.repeats}
    (out / "realisation_gap.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out / 'realisation_gap.json'}")


if __name__ == "__main__":
    main()
