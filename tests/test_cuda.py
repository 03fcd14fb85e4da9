"""On a CUDA device (skipped without one; run by benchmarks/gpu.sh on a lent GPU): the bundled
model picks and scores as on the CPU, the packed layout's variable-length attention equals the
padded layout, and bfloat16 / float16 autocast give no NaN."""
import copy

import pytest
import torch

import ats_vit
from ats_vit.jobs.loading import first_images, load_dataset, load_model
from reference import make_vit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def bundled():
    model = load_model()
    return model, first_images(load_dataset("fashion-mnist", model), 64)


def test_cuda_picks_and_logits_equal_the_cpu_in_float32(bundled):
    model, x = bundled
    cpu, gpu = ats_vit.apply(copy.deepcopy(model)), ats_vit.apply(copy.deepcopy(model).cuda())
    with torch.no_grad():
        a, b = cpu(x), gpu(x.cuda()).cpu()
    sa, sb = ats_vit.last_stats(cpu), ats_vit.last_stats(gpu)
    same = [all(torch.equal(p[i], q[i].cpu()) for p, q in zip(sa.positions, sb.positions)) for i in range(len(x))]
    assert sum(same) >= 0.95 * len(x)  # float32 kernels differ in rounding: a near-tie may move a pick
    assert (a[same] - b[same]).abs().max() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_packed_equals_padded_without_nan(dtype):
    base = make_vit("deit_small_patch16_224", img_size=96).cuda()
    x = torch.randn(16, 3, 96, 96, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        packed = ats_vit.apply(copy.deepcopy(base), num_tokens=0.8, mode="packed")
        out = packed(x).float()
        kept = ats_vit.last_stats(packed).num_kept
        padded = ats_vit.apply(copy.deepcopy(base), num_tokens=0.8, mode="padded")
        reference = padded(x).float()
    assert torch.isfinite(out).all() and torch.isfinite(reference).all()
    same = (ats_vit.last_stats(padded).num_kept == kept).all(dim=1)
    assert same.sum() >= 12
    assert (out[same] - reference[same]).abs().max() <= 0.05 * reference.abs().max()


def test_ats_waits_for_the_device_once_per_ats_block():
    """torch.cuda's sync debug mode warns at every synchronising call: a packed bfloat16 forward
    with three ATS blocks (flash varlen attention after them) may wait at most three times."""
    import warnings

    model = ats_vit.apply(make_vit("deit_small_patch16_224", img_size=96).cuda(), num_tokens=40, blocks=[3, 5, 8])
    x = torch.randn(16, 3, 96, 96, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)  # warm-up: lazy initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 3, [str(w.message) for w in syncs]
