"""Load a model (timm name, local weights, or the bundled one) and its evaluation data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import timm
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from .data import fashion_mnist
from .errors import UserError
from .zoo import FMNIST_MODEL


def load_model(model: Optional[str] = None, checkpoint: Optional[str] = None) -> nn.Module:
    """A timm model in eval mode, with weights through timm's own pretrained loading.

    ``model`` is a timm name (default: the bundled Fashion-MNIST ViT) or a local ``.safetensors``
    file with a metadata JSON beside it naming its timm model; ``checkpoint`` is a local weights
    file for a timm name. Without a checkpoint a timm name loads its pretrained weights, which
    needs them in timm's cache or a reachable hub.
    """
    name = model or FMNIST_MODEL
    if checkpoint is None and Path(name).suffix in (".safetensors", ".pth", ".pt", ".bin"):
        checkpoint, name = name, _model_name_beside(Path(name))
    if not timm.is_model(name):
        raise UserError(f"--model: unknown timm model {name!r} (see timm.list_models())")
    overlay, kwargs = None, {}
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"--checkpoint: no such file {checkpoint}")
        overlay = dict(file=str(Path(checkpoint).resolve()))
        classes = _head_classes(Path(checkpoint))
        if classes is not None:  # a fine-tuned checkpoint brings its own class count
            overlay["num_classes"] = kwargs["num_classes"] = classes
    try:
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as e:  # load_state_dict's size/key mismatch report
        first = str(e).strip().splitlines()[0]
        raise UserError(f"--checkpoint {checkpoint} does not fit {name}: {first}") from None
    except Exception as e:  # hub unreachable, unreadable file
        raise UserError(f"cannot load weights for {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        + ("" if checkpoint else " (pass --checkpoint FILE for local weights)")) from None
    return net.eval()


def _head_classes(path: Path) -> Optional[int]:
    """Output size of the checkpoint's ``head.weight``, if it is a safetensors file that has one."""
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("head.weight").get_shape()[0] if "head.weight" in f.keys() else None
    except Exception as e:
        raise UserError(f"--checkpoint {path} is not a readable safetensors file: {e}") from None


def _model_name_beside(path: Path) -> str:
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise UserError(f"--model {path}: a weights file needs {meta.name} beside it naming its timm model, "
                        "or use --model NAME --checkpoint FILE")
    return json.loads(meta.read_text())["model"]


def eval_transform(model: nn.Module, training: bool = False):
    """The model's own timm eval (or ``training``: train) transform, after converting images to
    its channel count."""
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
    """``fashion-mnist`` (its 10k test images) or an ImageNet-style folder of class sub-folders."""
    transform = eval_transform(model)
    if data == "fashion-mnist":
        dataset = fashion_mnist(train=False, root=root, transform=transform)
    else:
        if not Path(data).is_dir():
            raise UserError(f"--data: {data} is neither 'fashion-mnist' nor a folder")
        dataset = _image_folder(Path(data), transform)
    return _limited(dataset, limit)


def _image_folder(folder: Path, transform) -> Dataset:
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"--data {folder}: {e}") from None


def load_train_dataset(data: str, model: nn.Module, limit: Optional[int] = None,
                       root: Optional[str] = None) -> Dataset:
    """Training images: Fashion-MNIST's 60k (small shifts and flips, then the model's eval
    transform: timm's train crops are too strong for 28 px images), or ``data/train`` of an
    ImageNet-style folder with the model's timm train transform."""
    if data == "fashion-mnist":
        augment = transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(),
                                      eval_transform(model)])
        dataset = fashion_mnist(train=True, root=root, transform=augment)
    else:
        folder = Path(data) / "train"
        if not folder.is_dir():
            raise UserError(f"--data {data}: training needs 'fashion-mnist' or a folder with train/ and val/ "
                            "sub-folders of class folders")
        dataset = _image_folder(folder, eval_transform(model, training=True))
    return _limited(dataset, limit)


def _limited(dataset: Dataset, limit: Optional[int]) -> Dataset:
    if limit is None:
        return dataset
    if limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    return Subset(dataset, range(min(limit, len(dataset))))


def num_classes(dataset: Dataset) -> int:
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return len(base.classes)


def first_images(dataset: Dataset, count: int) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` stacked into one batch."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
