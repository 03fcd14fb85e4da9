from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

import ats_vit
from ats_vit.jobs.loading import eval_transform, read_image
from ats_vit.jobs.figures import DROPPED_FILL, plot_token_histogram, render_token_maps
from conftest import one_error_line, run


def patches_match(panel: np.ndarray, original: np.ndarray, kept: np.ndarray, grid, scale) -> bool:
    """Every kept patch shows the original pixels; every dropped one is exactly the fill colour."""
    gh, gw = grid
    ph, pw = original.shape[0] // gh * scale, original.shape[1] // gw * scale
    big = np.kron(original, np.ones((scale, scale, 1), dtype=np.uint8))
    for p in range(gh * gw):
        r, c = divmod(p, gw)
        got = panel[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw]
        want = big[r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] if kept[p] else np.array(DROPPED_FILL, dtype=np.uint8)
        if not (got == want).all():
            return False
    return True


def test_render_masks_exactly_the_dropped_patches():
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, size=(28, 28, 3), dtype=np.uint8)
    masks = [rng.random(196) < q for q in (0.9, 0.5, 0.1)]
    fig = render_token_maps(picture, (14, 14), masks, ["input", "a", "b", "c"])
    pixels = np.asarray(fig.image)
    assert fig.scale == 8 and len(fig.boxes) == 4
    for i, (left, top, right, bottom) in enumerate(fig.boxes):
        panel = pixels[top:bottom, left:right]
        kept = np.ones(196, dtype=bool) if i == 0 else masks[i - 1]
        assert patches_match(panel, picture, kept, (14, 14), fig.scale)
    assert not patches_match(pixels[fig.boxes[1][1]:fig.boxes[1][3], fig.boxes[1][0]:fig.boxes[1][2]],
                             picture, masks[2], (14, 14), fig.scale)


def test_render_rejects_picture_off_the_grid():
    with pytest.raises(ValueError, match="patch grid"):
        render_token_maps(np.zeros((30, 28, 3), np.uint8), (14, 14), [], ["input"])


def test_viz_command_on_image_files(tiny_checkpoint, image_folder, tmp_path, capsys):
    files = sorted(str(p) for p in image_folder.rglob("*.*"))[:3]  # three sizes and colour modes
    code, _, err = run(["viz", *files, "--model", str(tiny_checkpoint), "--num-tokens", "0.8",
                        "--out", str(tmp_path)], capsys)
    assert code == 0, err
    written = sorted(tmp_path.glob("*_tokens.png"))
    assert len(written) == 3

    # the same model and inputs, to read the positions ATS recorded
    model = ats_vit.apply(timm.create_model("vit_fmnist_patch2_28", pretrained=True,
                                            pretrained_cfg_overlay=dict(file=str(tiny_checkpoint)),
                                            num_classes=3).eval(), num_tokens=0.8)
    transform = eval_transform(model)
    batch = torch.stack([transform(read_image(f)) for f in files])
    with torch.no_grad():
        model(batch)
    stats = ats_vit.last_stats(model)
    # The expected pictures without the job's helpers: timm's own eval transform with mean 0 and
    # std 1 gives the model's input in [0, 1]; the masks come straight from the recorded positions.
    config = resolve_data_config({}, model=model)
    unnormalised = create_transform(**{**config, "mean": (0.0,), "std": (1.0,)})
    for i, f in enumerate(files):
        png = np.asarray(Image.open(tmp_path / f"{Path(f).stem}_tokens.png").convert("RGB"))
        assert png.shape == (2 * (224 + 14 + 6) + 6, 5 * (224 + 6) + 6, 3)
        pixels = unnormalised(read_image(f).convert("L"))[0]
        grey = np.repeat((pixels * 255).round().byte().numpy()[..., None], 3, axis=2)
        masks = [np.isin(np.arange(196), p[i][p[i] >= 0].numpy()) for p in stats.positions]
        for panel, kept in enumerate([np.ones(196, bool)] + masks):
            left = 6 + (panel % 5) * 230
            top = 6 + (panel // 5) * 244 + 14
            assert patches_match(png[top:top + 224, left:left + 224], grey, kept, (14, 14), 8)


def test_viz_fashion_mnist_images(tmp_path, capsys, tiny_checkpoint):
    code, _, err = run(["viz", "--fashion-mnist", "2", "--model", str(tiny_checkpoint), "--blocks", "3,7",
                        "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["fashion-mnist-0_tokens.png",
                                                              "fashion-mnist-1_tokens.png"]
    assert Image.open(tmp_path / "fashion-mnist-0_tokens.png").size == (3 * 230 + 6, 244 + 6)


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.png", "missing.png"),
    (lambda d: (d / "bad.jpg").write_bytes(b"\x00garbage") and d / "bad.jpg", "bad.jpg"),
])
def test_viz_unreadable_image_is_named(make, match, tmp_path, capsys, tiny_checkpoint):
    path = make(tmp_path)
    code, _, err = run(["viz", str(path), "--model", str(tiny_checkpoint), "--out", str(tmp_path)], capsys)
    assert code == 2 and match in err and one_error_line(err)


def test_viz_needs_some_image(capsys, tiny_checkpoint, tmp_path):
    code, _, err = run(["viz", "--model", str(tiny_checkpoint), "--out", str(tmp_path)], capsys)
    assert code == 2 and "--fashion-mnist" in err


def test_token_histogram_from_stats(tmp_path):
    model = ats_vit.apply(timm.create_model("vit_fmnist_patch2_28").eval(), num_tokens=0.7)
    with torch.no_grad():
        model(torch.randn(16, 1, 28, 28))
    stats = ats_vit.last_stats(model)
    path = plot_token_histogram(stats.num_kept.numpy(), stats.blocks, tmp_path / "h.png")
    image = Image.open(path)
    assert image.size[0] > 300 and image.size[1] > 300
