"""What a patched model did in its last forward: tokens kept, their positions, compute per image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import Tensor


@dataclass(frozen=True)
class ATSStats:
    """Per-image record of one forward of an ATS-patched model.

    Attributes:
        blocks: indices of the ATS (or EViT/ToMe) blocks (CvT: of the layers of its last stage).
        num_patches: patch tokens of the input (the grid size, e.g. 196 at 224 px with patch 16;
            CvT: of its last stage's grid, 196 at 224 px).
        num_kept: (B, L) patch tokens each image kept after each such block (EViT's fused token
            and ToMe's merged tokens count as one each).
        positions: L tensors (B, K'max): original patch index (row-major on the grid) of each
            patch token kept after that block, padded with -1 (ATS: ascending; EViT: its fused
            token is -1; ToMe: a merged token carries the position of the token it merged into).
        tokens: (B, depth + 1) tokens (prefix included) entering each block, then leaving the last
            (CvT: each layer of its last stage).
        gmacs: (B,) float64 GMACs of each image, counted from the tokens it kept.
        dense_gmacs: GMACs of one image through the unpatched model at the same input size.
    """
    blocks: Tuple[int, ...]
    num_patches: int
    num_kept: Tensor
    positions: Tuple[Tensor, ...]
    tokens: Tensor
    gmacs: Tensor
    dense_gmacs: float

    def kept_positions(self, image: int, block: int) -> list[int]:
        """Original patch positions that ``image`` still holds after ATS block ``block``."""
        if block not in self.blocks:
            raise ValueError(f"block must be one of the ATS blocks {list(self.blocks)}, got {block}")
        row = self.positions[self.blocks.index(block)][image]
        return row[row >= 0].tolist()

    @property
    def reduction(self) -> Tensor:
        """(B,) fraction of the dense GMACs each image saved."""
        return 1.0 - self.gmacs / self.dense_gmacs
