"""The real pretrained ImageNet ViT-Ti of ``../shared/imagenet``: the README's headline.

    python benchmarks/imagenet.py view [FOLDER]     # one folder view of sample-1000 and val-100 (symlinks)
    python benchmarks/imagenet.py report [RUN]      # tables (Markdown) and the accuracy-vs-speed figure

``make imagenet`` runs the whole of it: the view, ``ats-vit ablate`` on it (every reducer at 20 /
30 / 40 / 50% fewer GMACs, timed at batch 1 and 64), ``ats-vit viz`` on 8 sample images, then
``report``. The images stay in ``../shared/imagenet``: the view holds links to them.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ats_vit.jobs.eval import table_view  # noqa: E402
from ats_vit.jobs.report import write_json  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "imagenet"
SOURCES = ("sample-1000", "val-100")
VIEW = Path("runs/imagenet-1100")
RUN = Path("docs/imagenet")
CURVES = ("ATS 3-11", "top-K 3-11", "ToMe 3-11", "EViT 3-11")  # the accuracy-vs-speed figure's reducers


def make_view(folder: Path = VIEW) -> int:
    """``folder``/SYNSET/SOURCE-FILE links to every image of ``SOURCES`` (synset folders merged);
    returns the number of images."""
    count = 0
    for source in SOURCES:
        for synset in sorted(p for p in (SHARED / source).iterdir() if p.is_dir()):
            target = folder / synset.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(synset.iterdir()):
                link = target / f"{source}-{image.name}"
                if not link.is_symlink():
                    os.symlink(image.resolve(), link)
                count += 1
    return count


def _markdown(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(run: Path = RUN) -> None:
    """``run``/tables.md (the headline table and the accuracy-vs-speed table) and
    accuracy_vs_speed.{png,json} from ``run``/results.json."""
    result = json.loads((run / "results.json").read_text())
    rows, meta = result["rows"], result["meta"]
    view = table_view(rows)
    columns = ["method", "top-1", "95% CI", "top-1 vs", "top-1 vs dense", "agreement with dense", "GMACs",
               "reduction", "tokens per ATS block", "speed-up b1", "speed-up b64"]
    headline = _markdown(view, columns)
    curves = {}
    for row in rows:  # ATS's curve has its released configuration too (its family is ATS's)
        if row["family"] in CURVES or row["method"] == "dense":
            curves.setdefault(row["family"], []).append(row)
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    speed_rows = []
    for col, size in enumerate(("1", "64")):
        for line, (family, members) in enumerate(curves.items()):
            members = sorted(members, key=lambda r: r["speed"][size]["images_per_s"])
            x = [r["speed"][size]["images_per_s"] for r in members]
            for ax, key in zip(axes[:, col], ("top1", "agreement")):
                ax.plot(x, [r[key] for r in members], marker="o" if family != "dense" else "*",
                        markersize=6 if family != "dense" else 14, label=family)
        axes[0, col].set_title(f"batch {size}")
        axes[1, col].set_xlabel(f"images/s at batch {size} (model alone, {meta['threads']} threads, {meta['machine']})")
    axes[0, 0].set_ylabel("top-1 (%)")
    axes[1, 0].set_ylabel("agreement with dense top-1 (%)")
    axes[0, 0].legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    figure.suptitle(f"{meta['model']}, {meta['images']} real ImageNet images")
    figure.tight_layout()
    figure.savefig(run / "accuracy_vs_speed.png", dpi=110)
    for family, members in curves.items():
        for r in sorted(members, key=lambda r: -r["gmacs"]):
            speed_rows.append({"curve": family, "method": r["method"], "top-1": f"{r['top1']:.1f} ({r['top1_low']:.1f}-{r['top1_high']:.1f})",
                               "agreement": f"{r['agreement']:.1f} ({r['agreement_low']:.1f}-{r['agreement_high']:.1f})",
                               "GMACs": f"{r['gmacs']:.3f}",
                               **{f"img/s b{s}": f"{r['speed'][s]['images_per_s']:.1f}" for s in ("1", "64")},
                               **{f"ms b1 (median / p90)": f"{r['speed']['1']['median_ms']:.1f} / {r['speed']['1']['p90_ms']:.1f}"}})
    write_json(run / "accuracy_vs_speed.json", {"meta": meta, "rows": speed_rows})
    speed = _markdown(speed_rows, list(speed_rows[0]))
    (run / "tables.md").write_text(f"## Headline\n\n{headline}\n\n## Accuracy against measured speed\n\n{speed}\n")
    print((run / "tables.md").read_text())


if __name__ == "__main__":
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    if verb == "view":
        folder = Path(sys.argv[2]) if len(sys.argv) > 2 else VIEW
        print(f"{make_view(folder)} images linked under {folder}")
    elif verb == "report":
        report(Path(sys.argv[2]) if len(sys.argv) > 2 else RUN)
    else:
        sys.exit(__doc__)
