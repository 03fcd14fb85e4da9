"""Fixtures shared by the command-line tests: a user's own checkpoint and image folder."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from ats_vit.jobs.cli import main


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Random-init weights of the bundled architecture, saved as a user would save their own."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = timm.create_model("vit_fmnist_patch2_28", num_classes=3)
    path = folder / "mine.safetensors"
    save_file(model.state_dict(), str(path))
    (folder / "mine.json").write_text(json.dumps({"model": "vit_fmnist_patch2_28"}))
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """An ImageNet-style folder: class sub-folders, files of several sizes and modes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ["boot", "coat", "shirt"]:
        (root / name).mkdir()
        for i, (size, mode) in enumerate([((40, 30), "RGB"), ((28, 28), "L"), ((64, 50), "RGBA")]):
            pixels = rng.integers(0, 255, size=(size[1], size[0], len(mode)), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(), mode).save(root / name / f"{i}.{'jpg' if mode == 'RGB' else 'png'}")
    return root


def run(args, capsys):
    """Run the ``ats-vit`` command in-process: (exit code, stdout, stderr)."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> bool:
    """Exactly one error line and no traceback (progress bars may share stderr)."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    return len(lines) == 1 and lines[0].startswith("ats-vit: error: ") and "Traceback" not in err
