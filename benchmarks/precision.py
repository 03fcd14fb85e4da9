"""ATS under low-precision autocast against float32: how many images keep the same token sets
after every ATS block, and how many predictions agree, beside the dense model under the same
autocast. For scale, the same in float32 with the input perturbed by relative Gaussian noise:
how sensitive the selection itself is. The released configuration (blocks 3-11, K = all patch
tokens), the first N images: by default the bundled model on Fashion-MNIST; the real ViT-Ti on
ImageNet images with ``--model vit_tiny_patch16_224 --checkpoint ../shared/imagenet/...safetensors
--data runs/imagenet-1100`` (``python benchmarks/imagenet.py view`` makes that folder). Prints a
table, writes JSON.

    python benchmarks/precision.py [--images 256] [--dtypes bfloat16] [--noise 1e-4,1e-3] [--device cpu]
                                   [--model NAME --checkpoint FILE --data FOLDER] [--out runs/precision]
"""
import argparse
from contextlib import nullcontext
from pathlib import Path

import torch

import ats_vit
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from ats_vit.jobs.report import format_table, machine, write_json


def forward(model, images: torch.Tensor, dtype, batch_size: int = 64):
    """Predicted classes and, if ATS is applied, each image's kept positions after every ATS block."""
    preds, kept = [], []
    for chunk in images.split(batch_size):
        with torch.no_grad(), (torch.autocast(chunk.device.type, dtype=dtype) if dtype else nullcontext()):
            preds.append(model(chunk).argmax(-1).cpu())
        if ats_vit.is_patched(model):
            stats = ats_vit.last_stats(model)
            kept += [tuple(tuple(p[i][p[i] >= 0].tolist()) for p in stats.positions) for i in range(len(chunk))]
    return torch.cat(preds), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16, float16")
    parser.add_argument("--noise", default="1e-4,1e-3", help="comma-separated relative input noise levels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="timm name (default: the bundled model)")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--out", default="runs/precision")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_model(args.model, args.checkpoint).to(device)
    images = first_images(load_dataset(args.data, model), args.images).to(device)
    dense32, _ = forward(model, images, None)
    ats_vit.apply(model)
    ats32, kept32 = forward(model, images, None)
    torch.manual_seed(0)
    variants = [(name, getattr(torch, name), images) for name in args.dtypes.split(",")] + \
               [(f"float32, input noise {eps}", None, images * (1 + float(eps) * torch.randn_like(images)))
                for eps in args.noise.split(",")]
    rows = []
    for name, dtype, inputs in variants:
        ats_vit.remove(model)
        dense_other, _ = forward(model, inputs, dtype)
        ats_vit.apply(model)
        ats_other, kept_other = forward(model, inputs, dtype)
        rows.append({
            "run": name,
            "dense_predictions_agree_%": 100.0 * float((dense_other == dense32).double().mean()),
            "ats_predictions_agree_%": 100.0 * float((ats_other == ats32).double().mean()),
            "ats_same_token_sets_%": 100.0 * sum(a == b for a, b in zip(kept_other, kept32)) / len(kept32),
        })
    columns = list(rows[0])
    print(format_table(rows, columns))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "precision.json", {"model": args.model or "bundled", "data": args.data, "images": len(images),
                                        "rows": rows, **machine(args.device)})
    print(f"wrote {out / 'precision.json'}")


if __name__ == "__main__":
    main()
