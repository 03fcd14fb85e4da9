"""Datasets: Fashion-MNIST from Debian's package (or torchvision's download), and image folders."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torchvision import datasets
from torchvision.transforms import v2

from ..zoo import FMNIST_MEAN, FMNIST_STD

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
FASHION_MNIST_CLASSES = datasets.FashionMNIST.classes


def default_data_root() -> Path:
    return Path.home() / ".cache" / "ats-vit" / "data"


def _stage_debian_copy(root: Path) -> bool:
    """Unpack Debian's dataset-fashion-mnist files where torchvision's reader looks for them."""
    if not all((DEBIAN_FASHION_MNIST / f"{name}.gz").is_file() for name in _RAW_FILES):
        return False
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in _RAW_FILES:
        target = raw / name
        if not target.is_file():
            tmp = target.with_suffix(".part")
            with gzip.open(DEBIAN_FASHION_MNIST / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)
    return True


def fashion_mnist_augment() -> list:
    """Fashion-MNIST's training augmentation: a 2-pixel random shift and a horizontal flip (timm's
    train crops are too strong for 28 px images)."""
    return [v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()]


def fashion_mnist_transform(train: bool) -> Callable:
    """Tensor transform for Fashion-MNIST; training adds :func:`fashion_mnist_augment`."""
    augment = fashion_mnist_augment() if train else []
    return v2.Compose([v2.PILToTensor(), *augment, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(FMNIST_MEAN, FMNIST_STD)])


def fashion_mnist(train: bool, root: Optional[Union[str, Path]] = None,
                  transform: Optional[Callable] = None) -> datasets.FashionMNIST:
    """Fashion-MNIST (60k train / 10k test) read by torchvision.

    Uses Debian's ``dataset-fashion-mnist`` files when installed, else lets torchvision download.
    """
    root = Path(root) if root is not None else default_data_root()
    staged = _stage_debian_copy(root)
    return datasets.FashionMNIST(str(root), train=train, download=not staged,
                                 transform=transform if transform is not None else fashion_mnist_transform(train))
