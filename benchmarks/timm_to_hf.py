"""The real ViT-Ti through transformers: timm's weights converted to a ``ViTForImageClassification``
(``ats_vit.hosts.hf.save_vit_from_timm``), saved with the image processor of timm's transform,
then compared with timm's model on the 1100 images of ``../shared/imagenet``, dense and with ATS
(released configuration): logits and ATS's picks on the same pixels, and predictions when each
model reads the images through its own preprocessing (what ``ats-vit eval --model hf:FOLDER`` does).

    python benchmarks/timm_to_hf.py [FOLDER]   # default runs/vit_tiny_hf; writes docs/imagenet/hf_equivalence.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import ats_vit
from ats_vit.hosts.hf import save_vit_from_timm
from ats_vit.jobs.loading import load_dataset, load_model
from ats_vit.jobs.report import write_json

from imagenet import SHARED, VIEW, make_view

WEIGHTS = SHARED / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"


@torch.no_grad()
def main(folder: Path) -> dict:
    make_view(VIEW)
    timm_model = load_model("vit_tiny_patch16_224", str(WEIGHTS))
    save_vit_from_timm(timm_model, folder)
    hf_model = load_model(f"hf:{folder}")
    timm_ats = ats_vit.apply(load_model("vit_tiny_patch16_224", str(WEIGHTS)))
    hf_ats = ats_vit.apply(load_model(f"hf:{folder}"))
    timm_data, hf_data = load_dataset(str(VIEW), timm_model), load_dataset(str(VIEW), hf_model)
    assert [s for s, _ in timm_data.samples] == [s for s, _ in hf_data.samples]
    totals = dict.fromkeys(["images", "dense_same_pred", "ats_same_pred", "ats_same_picks", "own_dense_same_pred",
                            "own_ats_same_pred", "same_pixels"], 0)
    worst = {"dense": 0.0, "ats": 0.0}
    for (x, _), (xh, _) in tqdm(zip(DataLoader(timm_data, batch_size=50, num_workers=2),
                                     DataLoader(hf_data, batch_size=50, num_workers=2)), total=len(timm_data) // 50):
        dense_t, dense_h = timm_model(x), hf_model(pixel_values=x).logits
        ats_t = timm_ats(x)
        stats_t = ats_vit.last_stats(timm_ats)
        ats_h = hf_ats(pixel_values=x).logits
        stats_h = ats_vit.last_stats(hf_ats)
        worst["dense"] = max(worst["dense"], float((dense_t - dense_h).abs().max()))
        worst["ats"] = max(worst["ats"], float((ats_t - ats_h).abs().max()))
        totals["images"] += len(x)
        totals["dense_same_pred"] += int((dense_t.argmax(-1) == dense_h.argmax(-1)).sum())
        totals["ats_same_pred"] += int((ats_t.argmax(-1) == ats_h.argmax(-1)).sum())
        totals["ats_same_picks"] += sum(all(stats_t.kept_positions(b, i) == stats_h.kept_positions(b, i)
                                            for i in stats_t.blocks) for b in range(len(x)))
        totals["own_dense_same_pred"] += int((dense_t.argmax(-1) == hf_model(pixel_values=xh).logits.argmax(-1)).sum())
        totals["own_ats_same_pred"] += int((ats_t.argmax(-1) == hf_ats(pixel_values=xh).logits.argmax(-1)).sum())
        totals["same_pixels"] += int(((x - xh).abs().flatten(1).max(1).values < 0.01).sum())  # within 1/255 of range
    n = totals["images"]
    result = {"images": n, "max_abs_logit_diff_same_pixels": worst,
              **{f"{k}_pct": round(100 * v / n, 2) for k, v in totals.items() if k != "images"},
              "note": "same pixels: timm's transform fed to both models; own: each model's own preprocessing (the "
                      "processor centre-crops with floor((h - 224) / 2), torchvision with round(), a 1 px shift "
                      "where h - 224 is odd)"}
    write_json(Path("docs/imagenet/hf_equivalence.json"), result)
    return result


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/vit_tiny_hf")))
