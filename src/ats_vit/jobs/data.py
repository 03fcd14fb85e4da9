"""Datasets: Fashion-MNIST from Debian's package (or torchvision's download), and image folders."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

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


class ImageFolder(datasets.ImageFolder):
    """torchvision's ``ImageFolder`` with two changes.

    Its walk enters each real folder once, so a symlink loop (``c4/loop -> c4``) or a folder linked
    twice is not walked again and again; linked image files are read as usual. Given ``labels`` (the
    class names of a model's head in its order, e.g. ImageNet synsets), each class folder is numbered
    by its name's index there, whatever subset of the classes is present, instead of by its position
    among the folders present; ``classes`` is then ``labels``.
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None,
                 loader: Callable = datasets.folder.default_loader, labels: Optional[Sequence[str]] = None):
        self._labels = None if labels is None else list(labels)
        super().__init__(str(root), transform=transform, loader=loader, allow_empty=labels is not None)
        if not self.samples:
            raise FileNotFoundError(f"Found no image file in {root}")

    def find_classes(self, directory: Union[str, Path]) -> Tuple[List[str], Dict[str, int]]:
        if self._labels is None:
            return super().find_classes(directory)
        return self._labels, {name: i for i, name in enumerate(self._labels)}

    @staticmethod
    def make_dataset(directory: Union[str, Path], class_to_idx: Dict[str, int], extensions=None,
                     is_valid_file=None, allow_empty: bool = False) -> List[Tuple[str, int]]:
        valid = is_valid_file or (lambda path: datasets.folder.has_file_allowed_extension(path, extensions))
        tops = {name: os.path.join(directory, name) for name in sorted(class_to_idx)}
        reals = {name: os.path.realpath(top) for name, top in tops.items() if os.path.isdir(top)}
        # class folders are walked as their own class first: a link to one from inside another is skipped
        seen = set(reals.values())
        walked = set()
        samples, found = [], set()
        for name, real in reals.items():
            if real in walked:  # two class folders that are one folder
                continue
            walked.add(real)
            for root, files in _walk_once(tops[name], seen):
                for file in files:
                    path = os.path.join(root, file)
                    if valid(path):
                        samples.append((path, class_to_idx[name]))
                        found.add(name)
        empty = set(class_to_idx) - found
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))}")
        return samples


def _walk_once(top: str, seen: set) -> List[Tuple[str, List[str]]]:
    """``(folder, sorted file names)`` under ``top``, symlinked folders followed, each real folder
    not yet in ``seen`` (shared across calls) entered once; in torchvision's order (sorted by path)."""
    walked = []
    for root, dirs, files in os.walk(top, followlinks=True):
        keep = []
        for d in dirs:
            real = os.path.realpath(os.path.join(root, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        walked.append((root, sorted(files)))
    return sorted(walked)
