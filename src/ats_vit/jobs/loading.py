"""Load a model (timm name, local weights, or the bundled one) and its evaluation data."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import timm
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file
from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from ..hosts import default_blocks, is_transformers_model
from ..reducers.dynamicvit import PREDICTORS, predictors_of
from ..zoo import FMNIST_MODEL
from .data import ImageFolder, fashion_mnist, fashion_mnist_augment
from .errors import UserError


HF_PREFIX = "hf:"


def load_model(model: Optional[str] = None, checkpoint: Optional[str] = None, command: str = "eval") -> nn.Module:
    """A timm or transformers model in eval mode, with weights through the library's own loading.

    ``model`` is a timm name (default: the bundled Fashion-MNIST ViT), a local ``.safetensors``
    file with a metadata JSON beside it naming its timm model, or ``hf:`` and a transformers
    folder or hub name (a ViT, DeiT or CvT image classifier; needs ``ats-vit[hf]``);
    ``checkpoint`` is a local weights file for a timm name. Without a checkpoint a timm name
    loads its pretrained weights, which needs them in timm's cache or a reachable hub.
    ``command`` names the ``ats-vit`` command: only ``eval`` and ``ablate`` take ``hf:`` models.
    """
    name = model or FMNIST_MODEL
    if name.startswith(HF_PREFIX):
        if command not in ("eval", "ablate"):
            raise UserError(f"--model {name}: `ats-vit {command}` takes timm models; hf: models work with "
                            "`ats-vit eval` and `ats-vit ablate`")
        if checkpoint is not None:
            raise UserError("--checkpoint applies to timm models; an hf: model's folder holds its weights")
        return _load_transformers(name[len(HF_PREFIX):])
    if checkpoint is None and Path(name).suffix in (".safetensors", ".pth", ".pt", ".bin"):
        checkpoint, name = name, _model_name_beside(Path(name))
    if not timm.is_model(name):
        raise UserError(f"--model: unknown timm model {name!r} (see timm.list_models())")
    with torch.device("meta"):  # the architecture alone, no weights: refuse what ATS cannot patch first
        _check_supported(timm.create_model(name), f"--model {name}")
    overlay, kwargs, predictors = None, {}, ()
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"--checkpoint: no such file {checkpoint}")
        overlay = dict(file=str(Path(checkpoint).resolve()))
        classes, predictors = _inspect(Path(checkpoint))
        if classes is not None:  # a fine-tuned checkpoint brings its own class count
            overlay["num_classes"] = kwargs["num_classes"] = classes
    elif not getattr(timm.models.get_pretrained_cfg(name), "file", None):
        # timm's cache or the hub: say so, since an unreachable hub takes a while to give up
        print(f"loading pretrained weights for {name} from timm's cache or the hub "
              "(--checkpoint FILE loads local weights)", file=sys.stderr, flush=True)
    try:
        if predictors:  # DynamicViT's predictors ride along: build them, then load every key strictly
            net = timm.create_model(name, pretrained=False, **kwargs)
            predictors_of(net, predictors, net.embed_dim)
            net.load_state_dict(load_file(checkpoint))
        else:
            net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:  # load_state_dict's size/key mismatch report
        raise UserError(f"--checkpoint {checkpoint} does not fit {name}: {_first_mismatch(str(e))}") from None
    except Exception as e:  # hub unreachable, unreadable file
        raise UserError(f"cannot load weights for {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        + ("" if checkpoint else " (pass --checkpoint FILE for local weights)")) from None
    return net.eval()


def _load_transformers(name: str) -> nn.Module:
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise UserError(f"--model {HF_PREFIX}{name}: transformers is not installed; "
                        "pip install 'ats-vit[hf]'") from None
    try:
        net = AutoModelForImageClassification.from_pretrained(name)
    except Exception as e:  # no such folder, hub unreachable, not an image classifier
        raise UserError(f"--model {HF_PREFIX}{name}: cannot load it: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    _check_supported(net, f"--model {HF_PREFIX}{name}")
    return net.eval()


def _check_supported(model: nn.Module, what: str) -> None:
    try:
        default_blocks(model)  # refuses the classes ATS does not support
    except TypeError as e:
        raise UserError(f"{what}: {e}") from None


def _first_mismatch(report: str) -> str:
    """The first problem of a ``load_state_dict`` report: its header names only the class."""
    lines = [line.strip() for line in report.strip().splitlines()]
    detail = next((line for line in lines[1:] if line), lines[0])
    return detail if len(detail) <= 300 else detail[:300] + "..."


def _processor_transform(model: nn.Module):
    """The transformers model's own image processor, as a PIL -> tensor transform."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model.name_or_path)
    except Exception as e:
        raise UserError(f"--model {HF_PREFIX}{model.name_or_path}: no image processor beside the model "
                        f"({type(e).__name__}); save one there with processor.save_pretrained(FOLDER)") from None
    return transforms.Compose([transforms.Lambda(lambda im: im.convert("RGB")),
                               transforms.Lambda(lambda im: processor(images=im, return_tensors="pt")
                                                 ["pixel_values"][0])])


def _inspect(path: Path) -> Tuple[Optional[int], Tuple[int, ...]]:
    """Of a safetensors checkpoint: the output size of its ``head.weight`` (None without one) and
    the blocks of the DynamicViT predictors it holds (none for other files)."""
    if path.suffix != ".safetensors":
        return None, ()
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            classes = f.get_slice("head.weight").get_shape()[0] if "head.weight" in keys else None
    except Exception as e:
        raise UserError(f"--checkpoint {path} is not a readable safetensors file: {e}") from None
    prefix = PREDICTORS + "."
    return classes, tuple(sorted({int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}))


def _model_name_beside(path: Path) -> str:
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise UserError(f"--model {path}: a weights file needs {meta.name} beside it naming its timm model, "
                        "or use --model NAME --checkpoint FILE")
    try:
        name = json.loads(meta.read_text())["model"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--model {path}: {meta} must be JSON naming the timm model, like "
                        f'{{"model": "vit_small_patch16_224"}} ({type(e).__name__})') from None
    if not isinstance(name, str):
        raise UserError(f"--model {path}: the \"model\" of {meta} must be a timm model name, got {name!r}")
    return name


def eval_transform(model: nn.Module, training: bool = False):
    """The model's own timm eval (or ``training``: train) transform, after converting images to
    its channel count; a transformers model's own image processor (evaluation only)."""
    if is_transformers_model(model):
        if training:
            raise UserError("training transforms are available for timm models only, not hf: models")
        return _processor_transform(model)
    config = resolve_data_config({}, model=model)
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    return transforms.Compose([transforms.Lambda(lambda im: im.convert(mode)),
                               create_transform(**config, is_training=training)])


def read_image(path: str) -> Image.Image:
    """Open an image file fully, or raise a UserError naming it."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
        return image
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"cannot read image {path}: {type(e).__name__}") from None


def load_dataset(data: str, model: nn.Module, limit: Optional[int] = None, root: Optional[str] = None) -> Dataset:
    """``fashion-mnist`` (its 10k test images) or a folder of class sub-folders (see :func:`image_folder`)."""
    transform = eval_transform(model)
    if data == "fashion-mnist":
        return _limited(_matching(fashion_mnist(train=False, root=root, transform=transform), model), limit)
    if not Path(data).is_dir():
        raise UserError(f"--data: {data} is neither 'fashion-mnist' nor a folder")
    return _limited(image_folder(Path(data), model, transform), limit)


def head_size(model: nn.Module) -> int:
    """The number of classes of the model's head."""
    return model.config.num_labels if is_transformers_model(model) else model.num_classes


def head_synsets(model: nn.Module) -> Optional[List[str]]:
    """The ImageNet synsets of the model's head in its order, where timm's ``ImageNetInfo`` knows a
    label set of its class count (1000: ImageNet-1k; 11821, 21841, 21843...: the larger sets)."""
    subset = infer_imagenet_subset({"num_classes": head_size(model)})
    return None if subset is None else ImageNetInfo(subset).label_names()


def image_folder(folder: Path, model: nn.Module, transform, flag: str = "--data") -> Dataset:
    """The images under ``folder``'s class sub-folders (at any depth), labelled for ``model``'s head.

    Class folders named by ImageNet synsets of the head's label set are scored by the synset's index
    there, whatever subset of the classes is present (a validation folder of some classes,
    Imagenette, ImageNet-100); other folders must be one per class of the head, in its order."""
    try:
        present = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        synsets = head_synsets(model)
        if present and synsets is not None and set(present) <= set(synsets):
            dataset = ImageFolder(folder, transform, read_image, labels=synsets)
            print(f"{flag} {folder}: {len(present)} ImageNet synset folders, each image scored as its synset's "
                  f"index among the model's {len(synsets)} classes ({len(dataset)} images)", file=sys.stderr, flush=True)
            return dataset
        return _matching(ImageFolder(folder, transform, read_image), model)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{flag} {folder}: {e}") from None


def load_train_dataset(data: str, model: nn.Module, limit: Optional[int] = None,
                       root: Optional[str] = None) -> Dataset:
    """Training images: Fashion-MNIST's 60k (small shifts and flips, then the model's eval
    transform: timm's train crops are too strong for 28 px images), or ``data/train`` of an
    ImageNet-style folder with the model's timm train transform."""
    if data == "fashion-mnist":
        augment = transforms.Compose([*fashion_mnist_augment(), eval_transform(model)])
        return _limited(_matching(fashion_mnist(train=True, root=root, transform=augment), model), limit)
    folder = Path(data) / "train"
    if not folder.is_dir():
        raise UserError(f"--data {data}: training needs 'fashion-mnist' or a folder with train/ and val/ "
                        "sub-folders of class folders")
    return _limited(image_folder(folder, model, eval_transform(model, training=True)), limit)


def _matching(dataset: Dataset, model: nn.Module) -> Dataset:
    """``dataset``, if its labels can be the model's classes: a label is an index into the head."""
    head = head_size(model)
    if len(dataset.classes) != head:
        synsets = " or ImageNet synset folders (any subset)" if head_synsets(model) else ""
        raise UserError(f"--data has {len(dataset.classes)} classes but the model's head has {head}; use a "
                        f"folder with one sub-folder per class of the model (in its order){synsets}, or a "
                        "checkpoint trained on these classes")
    return dataset


def _limited(dataset: Dataset, limit: Optional[int]) -> Dataset:
    if limit is None:
        return dataset
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    return Subset(dataset, range(min(limit, len(dataset))))


def num_classes(dataset: Dataset) -> int:
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return len(base.classes)


def spread_images(dataset: Dataset, count: int) -> torch.Tensor:
    """``count`` images evenly spaced over ``dataset`` (all of it when it holds fewer), stacked: a
    calibration set that sees every part of a folder sorted by class, not its first classes."""
    n = len(dataset)
    return _stacked(dataset, sorted({(i * n) // count for i in range(count)}) if count < n else range(n))


def first_images(dataset: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` stacked into one batch."""
    return _stacked(dataset, range(min(count, len(dataset))))


def _stacked(dataset: Dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices])
