"""The ablation readings of an `ats-vit ablate` run, each with its verdict from the paired 95%
intervals in its results.json: "holds" when the whole interval of (ATS - variant) top-1 favours
the claim, "does not hold" when it favours the opposite, "cannot tell" when it straddles zero.
Prints a Markdown table (one column per budget) and writes it to JSON beside the results; given
several runs (e.g. two models'), also one table of the verdicts side by side, marking each reading
and budget where they disagree.

    python benchmarks/readings.py runs/ablate [more ablate folders, e.g. a second model's]
"""
import json
import sys
from pathlib import Path

from ats_vit.jobs.intervals import verdict

# (claim, the variant's family suffix after "ATS 3-11"/"top-K 3-11"...; the claim is "ATS beats it")
READINGS = [
    ("inverse transform sampling beats top-K", "top-K"),
    ("ATS beats random selection", "random selection"),
    ("the value norm helps", "no value norm"),
    ("the class-attention score beats attention from all queries", "all-query attention"),
    ("the class-attention score beats random scores", "random scores"),
    ("several ATS blocks beat one", "ATS block"),
    ("ATS beats EViT", "EViT"),
    ("ATS beats ToMe", "ToMe"),
]


def readings(folder: Path) -> list:
    rows = json.loads((folder / "results.json").read_text())["rows"]
    budgets = sorted({r["method"].rsplit(" ", 1)[1] for r in rows if r["target_gmacs"] is not None})  # matched rows
    out = []
    for claim, key in READINGS:
        cells = {}
        for budget in budgets:
            row = next((r for r in rows if key in r["family"] and r["method"].endswith(budget)
                        and r["family"] != "ATS 3-11"), None)
            if row is None:
                continue
            # the variant's difference to ATS, turned round: ATS - variant
            diff, low, high = -row["top1_diff"], -row["top1_diff_high"], -row["top1_diff_low"]
            cells[budget] = {"verdict": verdict(low, high), "diff": diff, "low": low, "high": high}
        out.append({"claim": claim, "cells": cells})
    return out


def main() -> None:
    runs = []
    for folder in map(Path, sys.argv[1:]):
        found = readings(folder)
        budgets = sorted({b for r in found for b in r["cells"]})
        meta = json.loads((folder / "results.json").read_text())["meta"]
        print(f"\n{meta['model']} ({meta['images']} images), ATS top-1 minus the variant's, 95% paired interval:\n")
        print("| reading | " + " | ".join(f"{b} GMACs" for b in budgets) + " |")
        print("|---|" + "---|" * len(budgets))
        for r in found:
            cells = [r["cells"].get(b) for b in budgets]
            print(f"| {r['claim']} | " + " | ".join(
                "-" if c is None else f"{c['verdict']} ({c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}])"
                for c in cells) + " |")
        (folder / "readings.json").write_text(json.dumps(found, indent=2))
        runs.append((meta["model"], found))
    if len(runs) > 1:
        side_by_side(runs)


def side_by_side(runs: list) -> None:
    """The runs' verdicts per reading and budget, "/" between models; **disagree** where they differ."""
    budgets = sorted({b for _, found in runs for r in found for b in r["cells"]})
    print("\nVerdicts, " + " / ".join(model for model, _ in runs) + ":\n")
    print("| reading | " + " | ".join(f"{b} GMACs" for b in budgets) + " |")
    print("|---|" + "---|" * len(budgets))
    for i, (claim, _) in enumerate(READINGS):
        cells = []
        for b in budgets:
            verdicts = [found[i]["cells"].get(b, {}).get("verdict", "-") for _, found in runs]
            cells.append(" / ".join(verdicts) + (" **disagree**" if len(set(verdicts) - {"-"}) > 1 else ""))  # "-": no such budget
        print(f"| {claim} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
