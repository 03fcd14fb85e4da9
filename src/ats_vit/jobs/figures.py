"""Figures: accuracy against compute, and how many tokens each ATS block kept."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image


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


# Token maps: plain pixel compositing (PIL), so every panel's pixels map exactly onto patches.
DROPPED_FILL = (64, 96, 168)  # a colour no grey-scale picture has, so dropped patches stand out
PANEL_PIXELS = 224  # inputs smaller than this are enlarged by an integer factor for display
TITLE_HEIGHT = 14
GAP = 6


@dataclass
class TokenMapFigure:
    """A rendered token-map figure and where each panel's picture lies in it (left, top, right, bottom)."""
    image: "Image.Image"
    boxes: List[Tuple[int, int, int, int]]
    scale: int

    def save(self, path: Union[str, Path]) -> Path:
        self.image.save(path)
        return Path(path)


def kept_patch_masks(stats, image: int) -> List[np.ndarray]:
    """For one image of an :class:`~ats_vit.ATSStats`, a (grid_h * grid_w,) bool mask per ATS block:
    True where the patch is still kept after that block."""
    masks = []
    for block in stats.blocks:
        mask = np.zeros(stats.num_patches, dtype=bool)
        mask[stats.kept_positions(image, block)] = True
        masks.append(mask)
    return masks


def to_display(image: "torch.Tensor", mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (C, H, W) model input back to an (H, W, 3) uint8 picture."""
    import torch

    c = image.shape[0]
    pixels = image * torch.tensor(std).view(c, 1, 1) + torch.tensor(mean).view(c, 1, 1)
    pixels = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return np.repeat(pixels, 3, axis=2) if c == 1 else pixels[..., :3]


def render_token_maps(picture: np.ndarray, grid: Tuple[int, int], masks: Sequence[np.ndarray],
                      titles: Sequence[str], columns: int = 5) -> TokenMapFigure:
    """The input picture, then one panel per mask with the dropped patches filled with
    ``DROPPED_FILL`` and the kept ones shown as they are.

    Args:
        picture: (H, W, 3) uint8 model input; H and W divisible by the grid.
        grid: patches per column and per row (grid_h, grid_w).
        masks: one (grid_h * grid_w,) bool kept-mask per panel after the first.
        titles: one title per panel, the input's first.
    """
    from PIL import Image, ImageDraw

    H, W = picture.shape[:2]
    gh, gw = grid
    if H % gh or W % gw:
        raise ValueError(f"picture {H}x{W} does not split into a {gh}x{gw} patch grid")
    scale = max(1, -(-PANEL_PIXELS // max(H, W)))
    big = np.kron(picture, np.ones((scale, scale, 1), dtype=np.uint8))
    ph, pw = H // gh * scale, W // gw * scale
    panels = [big]
    for mask in masks:
        panel = big.copy()
        for p in np.flatnonzero(~np.asarray(mask)):
            r, c = divmod(int(p), gw)
            panel[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = DROPPED_FILL
        panels.append(panel)
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    cell_w, cell_h = big.shape[1] + GAP, big.shape[0] + TITLE_HEIGHT + GAP
    canvas = Image.new("RGB", (cols * cell_w + GAP, rows * cell_h + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    boxes = []
    for i, (panel, title) in enumerate(zip(panels, titles)):
        left = GAP + (i % cols) * cell_w
        top = GAP + (i // cols) * cell_h + TITLE_HEIGHT
        canvas.paste(Image.fromarray(panel), (left, top))
        draw.text((left, top - TITLE_HEIGHT + 1), title, fill="black")
        boxes.append((left, top, left + panel.shape[1], top + panel.shape[0]))
    return TokenMapFigure(canvas, boxes, scale)
