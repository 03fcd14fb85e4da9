"""The evaluation engine the jobs share: a method (dense or a reducer configuration) applied to a
model, its accuracy and per-image GMACs over a data set, and budgets matched to a GMACs target."""
from __future__ import annotations

import time
import copy
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..hosts import apply, default_blocks, dense_gmacs, is_patched, last_stats, num_patches, remove, validate
from .distributed import Dist, gather
from .errors import UserError
from .timing import Speed


@dataclass(frozen=True)
class Method:
    """One row of an evaluation: dense (``blocks`` None) or a token reducer (ATS with a sampler
    and scorer, EViT or ToMe) with its blocks and budget."""
    label: str
    family: str
    blocks: Optional[Tuple[int, ...]] = None
    num_tokens: object = None
    sampler: str = "inverse_transform"
    mode: str = "packed"
    scorer: str = "cls_value"
    reducer: str = "ats"
    target_gmacs: Optional[float] = None  # the mean GMACs its budget was searched for
    reference: Optional[str] = None  # label of the row its accuracy is compared with (None: dense)

    def with_tokens(self, num_tokens, label: str) -> "Method":
        return replace(self, label=label, num_tokens=num_tokens)

    def patch_arguments(self) -> dict:
        """The method as :func:`ats_vit.apply`'s keyword arguments."""
        return dict(blocks=self.blocks, num_tokens=self.num_tokens, sampler=self.sampler, mode=self.mode,
                    scorer=self.scorer, reducer=self.reducer)


DENSE = Method("dense", "dense")
ITS_MAX_GRID = 4


@contextmanager
def _as_user_error() -> Iterator[None]:
    """apply's and validate's refusals (they leave the model untouched) as the user's error."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise UserError(f"{e} (from --blocks/--num-tokens/--sampler)") from None


def refusal(model: nn.Module, method: Method) -> Optional[str]:
    """Why ``model`` cannot run ``method`` (apply's error), or None."""
    try:
        validate(model, **method.patch_arguments())
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def check_method(model: nn.Module, method: Method) -> None:
    """Refuse, as the user's error, a method ``model`` cannot run; the model is not touched."""
    with _as_user_error():
        validate(model, **method.patch_arguments())


def apply_method(model: nn.Module, method: Method) -> nn.Module:
    """``model`` patched for ``method`` (the one path by which a job applies ATS)."""
    with _as_user_error():
        return apply(model, **method.patch_arguments())


@contextmanager
def configured(model: nn.Module, method: Method) -> Iterator[nn.Module]:
    """``model`` patched for ``method`` inside the block, restored after it."""
    if method.blocks is None:
        yield model
        return
    apply_method(model, method)
    try:
        yield model
    finally:
        remove(model)


@dataclass
class Result:
    method: Method
    top1: float
    top5: Optional[float]
    gmacs: np.ndarray  # per image
    num_kept: Optional[np.ndarray]  # (images, ATS blocks)
    seconds: float  # whole pass, data loading included
    hits: np.ndarray  # per image: top-1 correct
    predictions: np.ndarray  # per image: the top-1 class
    speeds: Dict[int, Speed] = field(default_factory=dict)  # the model alone, by timed batch size
    extra: dict = field(default_factory=dict)

    @property
    def mean_gmacs(self) -> float:
        return float(self.gmacs.mean())


def image_gmacs(model: nn.Module, images: torch.Tensor) -> float:
    """GMACs of one image through the unpatched ``model`` at the size of ``images``."""
    return dense_gmacs(model, *images.shape[-2:])


def logits_of(output) -> torch.Tensor:
    """A timm model's logits, or those of a transformers model's output."""
    return getattr(output, "logits", output)


def _forward_stats(model: nn.Module, images: torch.Tensor, dense: Optional[float] = None):
    """Logits, per-image GMACs and (ATS only) tokens kept per ATS block; ``dense``: the unpatched
    model's GMACs per image, if known."""
    if not is_patched(model):
        dense = image_gmacs(model, images) if dense is None else dense
        return logits_of(model(images)), torch.full((len(images),), dense, dtype=torch.float64), None
    logits = logits_of(model(images))
    stats = last_stats(model)
    return logits, stats.gmacs.cpu(), stats.num_kept.cpu()


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, classes: int, d: Dist = Dist(),
            desc: str = "eval", method: Method = DENSE) -> Result:
    """Top-1/top-5 accuracy, per-image GMACs and tokens kept of ``model`` as it is (patched or not)
    over ``loader``. Under torchrun each rank passes its :func:`~ats_vit.distributed.shard` and
    every rank gets the whole dataset's result, in dataset order."""
    model.eval()
    hit1, hit5, gmacs, kept, guesses = [], [], [], [], []
    dense = None
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not d.main):
        images = images.to(device)
        if dense is None and not is_patched(model):
            dense = image_gmacs(model, images)
        logits, g, k = _forward_stats(model, images, dense)
        top = logits.topk(min(5, classes), dim=-1).indices.cpu()
        guesses.append(top[:, 0])
        hit1.append(top[:, 0] == labels)
        hit5.append((top == labels[:, None]).any(dim=1))
        gmacs.append(g)
        if k is not None:
            kept.append(k)
    seconds = time.perf_counter() - start
    hit1, hit5, g, guess = (gather(torch.cat(t), d) for t in (hit1, hit5, gmacs, guesses))
    k = gather(torch.cat(kept), d) if kept else None
    n = len(g)
    return Result(method, 100.0 * int(hit1.sum()) / n, 100.0 * int(hit5.sum()) / n if classes > 5 else None,
                  g.numpy(), None if k is None else k.numpy(), seconds, hit1.numpy(), guess.numpy())


def evaluate_method(model: nn.Module, loader: DataLoader, method: Method, device: torch.device,
                    classes: int, d: Dist = Dist()) -> Result:
    """:func:`predict` with ``model`` configured for ``method``."""
    with configured(model, method):
        return predict(model, loader, device, classes, d, method.label, method)


@torch.no_grad()
def mean_gmacs(model: nn.Module, method: Method, images: torch.Tensor, batch_size: int) -> float:
    """Mean GMACs per image of ``method`` on ``images`` (a calibration batch)."""
    with configured(model, method):
        return float(torch.cat([_forward_stats(model, chunk)[1]
                                for chunk in images.split(batch_size)]).mean())


def match_gmacs(measure: Callable[[float], float], target: float, tolerance: float = 0.005,
                iterations: int = 24) -> Tuple[float, float]:
    """Bisect a knob in (0, 1] whose mean GMACs grows with it until it lands on ``target``.

    Returns the knob and the GMACs it gives; the closest seen if ``tolerance`` is not reached.
    """
    lo, hi = 1e-4, 1.0
    g_lo, g_hi = measure(lo), measure(hi)
    best = min([(abs(g_lo - target), lo, g_lo), (abs(g_hi - target), hi, g_hi)])
    for _ in range(iterations):
        if best[0] <= tolerance * target:
            break
        mid = 0.5 * (lo + hi)
        g = measure(mid)
        best = min(best, (abs(g - target), mid, g))
        lo, hi = (mid, hi) if g < target else (lo, mid)
    return best[1], best[2]


def budget_for(model: nn.Module, method: Method, images: torch.Tensor, target: float, batch_size: int,
               label: str) -> Tuple[Method, float]:
    """``method`` with ``num_tokens`` chosen so its mean GMACs on ``images`` hit ``target``, and
    the mean GMACs it gives there.

    Top-K takes a fraction of the tokens entering each block. Inverse transform sampling keeps
    fewer distinct tokens than it has grid points, so it takes one K for every ATS block, from 1
    up to ``ITS_MAX_GRID`` times the patch count: the released K (the patch count) is inside that
    range, not its top."""
    patches = num_patches(model, *images.shape[-2:])

    def budget(knob: float):
        if method.reducer != "ats" or method.sampler != "inverse_transform":
            return knob
        return max(1, round(knob * ITS_MAX_GRID * patches))

    knob, gmacs = match_gmacs(lambda f: mean_gmacs(model, method.with_tokens(budget(f), label), images, batch_size),
                              target)
    return replace(method.with_tokens(budget(knob), label), target_gmacs=target), gmacs


def check_target(model: nn.Module, method: Method, images: torch.Tensor, target: float, batch_size: int) -> None:
    """A target must lie between one token per ATS block and dense."""
    dense = image_gmacs(model, images)
    floor = mean_gmacs(model, method.with_tokens(1, "floor"), images, batch_size)
    if not floor <= target <= dense:
        raise UserError(f"--target-gmacs {target:g} is outside what this configuration can reach: "
                        f"{floor:.4g} (one token per ATS block) to {dense:.4g} (dense)")


def default_suite(model: nn.Module, images: torch.Tensor, batch_size: int,
                  reductions: Sequence[float] = (0.4, 0.5, 0.6),
                  progress: Callable[[str], None] = lambda s: None) -> List[Method]:
    """The paper's comparison on ``model``: dense; ATS in its default blocks (timm, ViT, DeiT:
    3..last; CvT: last-stage layers 1..9), released (K = all patches) and at ``reductions`` of
    dense GMACs; top-K and ATS in the first of those blocks alone at each ATS row's measured GMACs
    (the single block only at the lower budgets). Budgets are found on ``images`` (a calibration
    batch)."""
    late = default_blocks(model)
    span = f"{late[0]}-{late[-1]}"
    multi = Method(f"ATS {span}", f"ATS blocks {span}", late)
    topk = Method("", f"top-K blocks {span}", late, sampler="topk")
    single = Method("", f"ATS block {late[0]}", late[:1])
    dense = image_gmacs(model, images)
    released = multi.with_tokens(None, f"ATS {span} released (K=all)")
    ats_rows = [(released, mean_gmacs(model, released, images, batch_size))]
    for r in reductions:
        progress(f"finding the ATS budget for {r:.0%} fewer GMACs")
        ats_rows.append(budget_for(model, multi, images, (1 - r) * dense, batch_size, f"ATS {span} -{r:.0%}"))
    methods = [DENSE, *(row for row, _ in ats_rows)]
    for row, target in ats_rows:
        progress(f"matching top-K{' and single-block ATS' if row is not released else ''} to {row.label} "
                 f"({target:.4g} GMACs)")
        for rival, label in ((topk, f"top-K {span} = {row.label}"), (single, f"ATS {late[0]} only = {row.label}")):
            if rival is topk or row is not released:
                methods.append(replace(budget_for(model, rival, images, target, batch_size, label)[0],
                                       reference=row.label))
    return methods


@contextmanager
def configured_copies(model: nn.Module, methods: Sequence[Method]) -> Iterator[List[nn.Module]]:
    """A copy of ``model`` configured for each of ``methods``, so they can run in turn."""
    with ExitStack() as stack:
        yield [stack.enter_context(configured(copy.deepcopy(model), m)) for m in methods]
