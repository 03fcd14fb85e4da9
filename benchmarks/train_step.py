"""Seconds per training step on the bundled model, quietly and side by side: the dense model,
fine-tuning with ATS at K, and DynamicViT's training forward (masks, teacher, its loss) at keep
ratio rho, each with the loss `ats-vit finetune` uses, backward and an AdamW step, batch 128 of
real training images. The trade table's training cost, free of whatever else the machine ran
during the long runs. Prints a table, writes JSON.

    python benchmarks/train_step.py [--k 208] [--rho 0.6094] [--steps 5] [--out runs/train_step]
"""
import argparse
import copy
import time
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

import ats_vit
from ats_vit.jobs import finetune
from ats_vit.jobs.loading import first_images, load_model, load_train_dataset
from ats_vit.jobs.report import format_table, machine, write_json
from ats_vit.jobs.training import TrainConfig


def seconds_per_step(model, loss, images, labels, steps: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        opt.zero_grad()
        loss(model, images, labels).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=208, help="ATS's K (208: -50%% GMACs on the bundled model)")
    parser.add_argument("--rho", type=float, default=0.6094, help="DynamicViT's keep ratio (0.6094: -50%%)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="runs/train_step")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = load_model()
    data = load_train_dataset("fashion-mnist", base)
    images = first_images(data, args.batch)
    labels = torch.tensor([data[i][1] for i in range(args.batch)])
    smoothing = TrainConfig().label_smoothing

    def cross_entropy(net, x, y):
        return F.cross_entropy(net(x), y, label_smoothing=smoothing)

    dense = copy.deepcopy(base)
    ats = ats_vit.apply(copy.deepcopy(base), num_tokens=args.k)
    dynamicvit = copy.deepcopy(base)
    teacher = finetune._frozen(dynamicvit)
    ats_vit.apply(dynamicvit, reducer="dynamicvit", num_tokens=args.rho)
    budgets = [args.rho] * 3
    cases = [("dense", dense, cross_entropy), (f"ATS fine-tuning, K={args.k}", ats, cross_entropy),
             (f"DynamicViT training, rho={args.rho}", dynamicvit,
              finetune._dynamicvit_objective(dynamicvit, teacher, budgets, smoothing))]
    rows = [{"model": name, "s_per_step": seconds_per_step(m, loss, images, labels, args.steps)}
            for name, m, loss in cases]
    for r in rows:
        r["vs_dense"] = r["s_per_step"] / rows[0]["s_per_step"]
    print(format_table(rows, ["model", "s_per_step", "vs_dense"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train_step.json", {"rows": rows, "batch": args.batch, "steps": args.steps, **machine("cpu")})


if __name__ == "__main__":
    main()
