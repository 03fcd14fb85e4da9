"""DynamicViT (Rao et al., NeurIPS 2021), the trained rival the ATS paper argues against: a small
prediction network before each pruning block scores the patch tokens, and the block and those
after it run on the tokens it keeps.

Written from the paper. In training nothing is removed: hard Gumbel-softmax keep decisions
multiply into a running mask (a dropped token stays dropped), the blocks' attention ignores dropped
keys (each token still sees itself) and the loss (:func:`dynamicvit_loss`) pulls each stage's
kept fraction to its target. At inference each pruning block keeps the top k patch tokens by
keep probability, the same count for every image.

The predictors are parameters of the model (``model.token_predictors``, one per pruning block,
added by :func:`ats_vit.apply` when missing and kept by :func:`ats_vit.remove`), so fine-tuning
trains them, state dicts carry them and a trained model keeps them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from ..core.block import SELECT_RANGE, dense_block, uniform_shape
from ..core.budget import NumTokens, uniform_k
from ..core.parts import BlockParts
from ..core.tokens import Layout, Tokens

PREDICTORS = "token_predictors"  # the model's attribute holding them, keyed by block index
# The paper's loss weights: cross-entropy + 2 keep-ratio MSE + 0.5 KL to the teacher + 0.5 token distillation.
RATIO_WEIGHT, KL_WEIGHT, DISTILL_WEIGHT = 2.0, 0.5, 0.5


class KeepPredictor(nn.Module):
    """One prediction module: LayerNorm, Linear(C, C) and GELU on the patch tokens; half the
    channels stay local, the other half are averaged over the currently kept tokens into a global
    feature concatenated back to every token; an MLP (C -> C/2 -> C/4 -> 2, GELU between) gives
    keep / drop log-probabilities."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.score = nn.Sequential(nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, width // 4),
                                   nn.GELU(), nn.Linear(width // 4, 2))

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """Log-probabilities (B, n, 2), keep first, of patch tokens ``x`` (B, n, C) of which
        ``keep`` (B, n) marks those still kept."""
        local, world = self.embed(x).chunk(2, dim=-1)
        w = keep.to(world.dtype)[:, :, None]
        world = (world * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return F.log_softmax(self.score(torch.cat([local, world.expand_as(local)], dim=-1)), dim=-1)


def check_predictors(model: nn.Module, blocks: Sequence[int]) -> None:
    """A ValueError when the model holds predictors for other blocks than ``blocks``."""
    held = getattr(model, PREDICTORS, None)
    if held is not None and sorted(int(i) for i in held.keys()) != list(blocks):
        raise ValueError(f"this model's DynamicViT predictors are for blocks {sorted(int(i) for i in held.keys())}, "
                         f"not {list(blocks)}")


def predictors_of(model: nn.Module, blocks: Sequence[int], width: int) -> Dict[int, KeepPredictor]:
    """The model's predictors for ``blocks``, created (freshly initialised, on the model's device,
    dtype and training mode) when it has none."""
    check_predictors(model, blocks)
    if getattr(model, PREDICTORS, None) is None:
        param = next(model.parameters())
        model.add_module(PREDICTORS, nn.ModuleDict({str(i): KeepPredictor(width) for i in blocks}).to(
            param.device, param.dtype).train(model.training))
    held = getattr(model, PREDICTORS)
    return {i: held[str(i)] for i in blocks}


def dynamicvit_block(block: BlockParts, tokens: Tokens, num_prefix: int, k: int, predictor: KeepPredictor) -> Tokens:
    """The block with DynamicViT's pruning before it: ``predictor`` scores the patch tokens; in
    training a hard Gumbel-softmax decision joins the running keep mask (straight-through, so the
    predictor learns from the loss), in evaluation the ``k`` most likely kept go on, ascending."""
    B, N = uniform_shape(tokens, "DynamicViT")
    P = num_prefix
    x = tokens.padded()
    if predictor.training:
        keep = tokens.keep if tokens.keep is not None else x.new_ones(B, N)
        decision = F.gumbel_softmax(predictor(x[:, P:], keep[:, P:]), hard=True)[..., 0]
        keep = torch.cat([keep[:, :P], keep[:, P:] * decision.to(keep.dtype)], dim=1)
        return dense_block(block, replace(tokens, keep=keep))
    with record_function(SELECT_RANGE):
        keep_logp = predictor(x[:, P:], x.new_ones(B, N - P))[..., 0]
        index = keep_logp.topk(k, dim=1).indices.sort(dim=1).values
    kept = torch.cat([x[:, :P], x[:, P:].gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))], dim=1)
    layout = Layout.dense(B, P + k, x.device, tokens.layout.packed)
    return dense_block(block, Tokens(kept.flatten(0, 1), layout, tokens.positions.gather(1, index)))


def keep_targets(num_tokens: Sequence[NumTokens], num_patches: int) -> List[float]:
    """Each pruning stage's target kept fraction of the patch tokens: the fraction inference
    keeps there (each budget applies to the tokens entering its block)."""
    targets, count = [], num_patches
    for budget in num_tokens:
        count = uniform_k(budget, count)
        targets.append(count / num_patches)
    return targets


def dynamicvit_loss(logits: Tensor, labels: Tensor, teacher_logits: Tensor, features: Tensor,
                    teacher_features: Tensor, keep_masks: Sequence[Tensor], targets: Sequence[float],
                    num_prefix: int, label_smoothing: float = 0.0) -> Tuple[Tensor, Dict[str, Tensor]]:
    """DynamicViT's training loss and its terms.

    cross-entropy + 2 x the mean over stages and images of (the image's kept fraction - its target)^2
    + 0.5 x KL(student || teacher) of the predicted distributions (batch mean)
    + 0.5 x the mean squared difference of the final patch tokens kept by the last mask from the
    dense teacher's (per kept token and channel).

    Args:
        logits, teacher_logits: (B, classes); features, teacher_features: the final normed
            tokens (B, N, C); keep_masks: each stage's running mask (B, N), prefix first.
    """
    P = num_prefix
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    # Each image's own kept fraction against the target (the paper's eq. 13), not the batch's:
    # inference keeps the same count in every image, so every image must learn to keep it.
    ratio = torch.stack([((m[:, P:].mean(dim=1) - t) ** 2).mean() for m, t in zip(keep_masks, targets)]).mean()
    wide = torch.promote_types(logits.dtype, torch.float32)  # (half-precision autocast outputs)
    student, teacher = F.log_softmax(logits.to(wide), dim=-1), F.log_softmax(teacher_logits.to(wide), dim=-1)
    kl = F.kl_div(teacher, student, reduction="batchmean", log_target=True)  # sum p_s (log p_s - log p_t)
    wide = torch.promote_types(features.dtype, torch.float32)
    kept = keep_masks[-1][:, P:, None].to(wide)
    squared = (features[:, P:].to(wide) - teacher_features[:, P:].to(wide)) ** 2
    distill = (squared * kept).sum() / (kept.sum() * features.shape[-1]).clamp_min(1.0)
    terms = {"ce": ce, "ratio": ratio, "kl": kl, "distill": distill}
    return ce + RATIO_WEIGHT * ratio + KL_WEIGHT * kl + DISTILL_WEIGHT * distill, terms
