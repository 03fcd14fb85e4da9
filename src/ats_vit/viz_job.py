"""The ``ats-vit viz`` job: per-image token maps of what each ATS block kept."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from timm.data import resolve_data_config

from .data import FASHION_MNIST_CLASSES, fashion_mnist
from .errors import UserError
from .loading import eval_transform, load_model, read_image
from .patch import apply, last_stats
from .viz import kept_patch_masks, render_token_maps, to_display


@dataclass
class VizOptions:
    images: Sequence[str] = field(default_factory=list)
    fashion_mnist: int = 0
    model: Optional[str] = None
    checkpoint: Optional[str] = None
    blocks: Optional[Sequence[int]] = None
    num_tokens: object = None
    sampler: str = "inverse_transform"
    out: str = "runs/viz"


def _class_names(num_classes: int, fashion: bool) -> Optional[List[str]]:
    if fashion:
        return list(FASHION_MNIST_CLASSES)
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return None


def run_viz(options: VizOptions) -> List[Path]:
    """Write one PNG per image: the input and one panel per ATS block; returns their paths."""
    if not options.images and options.fashion_mnist < 1:
        raise UserError("give image files, or --fashion-mnist N (N >= 1) for test images")
    model = load_model(options.model, options.checkpoint, "viz")
    transform = eval_transform(model)
    inputs, names, truths = [], [], []
    for path in options.images:
        inputs.append(transform(read_image(path)))
        names.append(Path(path).stem)
        truths.append(None)
    if options.fashion_mnist > 0:
        test = fashion_mnist(train=False, transform=transform)
        for i in range(min(options.fashion_mnist, len(test))):
            image, label = test[i]
            inputs.append(image)
            names.append(f"fashion-mnist-{i}")
            truths.append(label)
    try:
        apply(model, blocks=options.blocks, num_tokens=options.num_tokens, sampler=options.sampler)
    except (ValueError, TypeError) as e:
        raise UserError(f"{e} (from --blocks/--num-tokens/--sampler)") from None
    batch = torch.stack(inputs)
    with torch.no_grad():
        predictions = model(batch).argmax(-1).tolist()
    stats = last_stats(model)
    config = resolve_data_config({}, model=model)
    labels = _class_names(model.num_classes, options.fashion_mnist > 0 and not options.images)
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
    print(f"wrote {len(written)} token maps to {out}")
    return written
