"""The models that ship with ats-vit, registered with timm so timm's own loading serves them.

``timm.create_model("vit_fmnist_patch2_28", pretrained=True)`` loads the committed safetensors
file through timm's ``pretrained_cfg`` machinery (``file=``), exactly as a user's own weights
load with ``pretrained_cfg_overlay=dict(file=...)``.
"""
from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS_DIR = Path(__file__).parent / "weights"
FMNIST_MODEL = "vit_fmnist_patch2_28"
FMNIST_WIDE_MODEL = "vit_fmnist_w64_patch2_28"


def weights_file(name: str) -> Path:
    """The committed safetensors weights of the bundled model ``name`` (its metadata JSON beside it)."""
    return WEIGHTS_DIR / f"{name}.safetensors"


FMNIST_WEIGHTS = weights_file(FMNIST_MODEL)
FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)

# DeiT-like: class token, 12 blocks and a 14 x 14 grid of 196 patch tokens (DeiT at 224 px),
# narrow enough to train on a 2-core CPU (width 48 in about 110 minutes, width 64 in about 130
# quietly). The wider one exists so that every reading of the ablations is checked on a second,
# independently trained model.
FMNIST_ARCH = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=48, depth=12, num_heads=3)
BUNDLED = {FMNIST_MODEL: FMNIST_ARCH, FMNIST_WIDE_MODEL: {**FMNIST_ARCH, "embed_dim": 64, "num_heads": 4}}

default_cfgs = generate_default_cfgs({
    f"{name}.ats": dict(
        file=str(weights_file(name)), num_classes=10, input_size=(1, 28, 28), mean=FMNIST_MEAN,
        std=FMNIST_STD, crop_pct=1.0, interpolation="bilinear", first_conv="patch_embed.proj", classifier="head",
        license="apache-2.0", notes=("Trained by `ats-vit train` on Fashion-MNIST; see fmnist metadata JSON.",),
    ) for name in BUNDLED
})


def _build(name: str, pretrained: bool, kwargs: dict) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**BUNDLED[name], **kwargs})


@register_model
def vit_fmnist_patch2_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 28 x 28 Fashion-MNIST: patch 2, width 48, 3 heads, 12 blocks."""
    return _build(FMNIST_MODEL, pretrained, kwargs)


@register_model
def vit_fmnist_w64_patch2_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 28 x 28 Fashion-MNIST: patch 2, width 64, 4 heads, 12 blocks."""
    return _build(FMNIST_WIDE_MODEL, pretrained, kwargs)
