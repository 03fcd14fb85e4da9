"""The ``ats-vit viz`` command: per-image token maps of what each ATS block kept."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from timm.data import resolve_data_config

from ..hosts import last_stats
from .data import FASHION_MNIST_CLASSES, fashion_mnist
from .errors import UserError
from .evaluation import Method, apply_method
from .figures import kept_patch_masks, render_token_maps, to_display
from .loading import eval_transform, head_synsets, load_model, read_image
from .options import BLOCKS, CHECKPOINT, MODEL, NUM_TOKENS, OUT, SAMPLER, Option, at_least, check_options

IMAGES = Option("images", nargs="*", help="image files (PNG, JPEG, any size and mode)")
FASHION_MNIST = Option("--fashion-mnist", int, "also draw the first N test images", check=at_least(0), metavar="N")


@dataclass
class VizOptions:
    images: Sequence[str] = IMAGES([])
    fashion_mnist: int = FASHION_MNIST(0)
    model: Optional[str] = MODEL()
    checkpoint: Optional[str] = CHECKPOINT()
    blocks: Optional[Sequence[int]] = BLOCKS()
    num_tokens: object = NUM_TOKENS()
    sampler: str = SAMPLER("inverse_transform")
    out: str = OUT("runs/viz")
    command: str = ""


def _class_names(num_classes: int, fashion: bool) -> Optional[List[str]]:
    if fashion:
        return list(FASHION_MNIST_CLASSES)
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]  # its first name
    return None


def _unique(name: str, taken: List[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... when inputs share a file name."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def run_viz(options: VizOptions) -> List[Path]:
    """Write one PNG per image: the input and one panel per ATS block; returns their paths."""
    check_options(options)
    if not options.images and options.fashion_mnist < 1:
        raise UserError("give image files, or --fashion-mnist N (N >= 1) for test images")
    model = load_model(options.model, options.checkpoint, "viz")
    transform = eval_transform(model)
    inputs, names, truths = [], [], []
    synsets = head_synsets(model) or []
    for path in options.images:
        inputs.append(transform(read_image(path)))
        names.append(_unique(Path(path).stem, names))
        folder = Path(path).parent.name  # an ImageNet synset folder names the image's class
        truths.append(synsets.index(folder) if folder in synsets else None)
    if options.fashion_mnist > 0:
        test = fashion_mnist(train=False, transform=transform)
        for i in range(min(options.fashion_mnist, len(test))):
            image, label = test[i]
            inputs.append(image)
            names.append(f"fashion-mnist-{i}")
            truths.append(label)
    apply_method(model, Method("viz", "ATS", options.blocks, options.num_tokens, options.sampler))
    batch = torch.stack(inputs)
    with torch.no_grad():
        predictions = model(batch).argmax(-1).tolist()
    stats = last_stats(model)
    config = resolve_data_config({}, model=model)
    labels = _class_names(model.num_classes, options.fashion_mnist > 0 and not options.images)
    correct = sum(t == p for t, p in zip(truths, predictions) if t is not None)
    name_of = (lambda i: labels[i]) if labels else str
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (name, truth) in enumerate(zip(names, truths)):
        guess = name_of(predictions[i])
        head = f"{name_of(truth)} -> {guess}" if truth is not None else f"{name}: {guess}"
        titles = [head] + [f"block {b}: {int(n)} tokens" for b, n in zip(stats.blocks, stats.num_kept[i])]
        picture = to_display(batch[i], config["mean"], config["std"])
        figure = render_token_maps(picture, tuple(model.patch_embed.grid_size), kept_patch_masks(stats, i), titles)
        written.append(figure.save(out / f"{name}_tokens.png"))
    known = sum(t is not None for t in truths)
    print(f"wrote {len(written)} token maps to {out}" + (f"; {correct} of {known} labelled images right" if known else ""))
    return written


COMMAND = dict(name="viz", options=VizOptions, run=run_viz, help="draw, per image, the patches each ATS block kept")
