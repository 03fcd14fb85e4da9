"""Figures: accuracy against compute, and how many tokens each ATS block kept."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy_vs_gmacs(series: Dict[str, List[Tuple[float, float]]], path: Union[str, Path],
                           title: str = "") -> Path:
    """One line per method through its (GMACs, top-1) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o" if len(points) == 1 else "o-", label=name)
    ax.set_xlabel("GMACs per image (measured)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_token_histogram(num_kept: np.ndarray, blocks: Sequence[int], path: Union[str, Path],
                         title: str = "") -> Path:
    """One histogram per ATS block of the patch tokens each image kept (``num_kept``: images x blocks)."""
    plt = _pyplot()
    num_kept = np.asarray(num_kept)
    cols = min(len(blocks), 3)
    rows = -(-len(blocks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False, sharey=True)
    low, top = (int(num_kept.min()), int(num_kept.max())) if num_kept.size else (0, 1)
    bins = np.arange(low, top + 2) - 0.5 if top - low <= 60 else np.linspace(low - 0.5, top + 0.5, 41)
    for ax, block, counts in zip(axes.flat, blocks, num_kept.T):
        ax.hist(counts, bins=bins, color="tab:blue")
        ax.set_title(f"block {block}: mean {counts.mean():.1f}", fontsize=9)
        ax.set_xlabel("tokens kept", fontsize=8)
    for ax in list(axes.flat)[len(blocks):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
