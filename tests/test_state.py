"""No per-forward state on the model: cached features, threads, inference_mode, pickling,
tracers and Ctrl-C (docs/bad-input.md lists each case and its outcome)."""
import copy
import io
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import ats_vit
from reference import make_vit
from reference_hf import image_size, make_hf

REDUCERS = [("ats", None), ("evit", 0.6), ("tome", 0.6)]


def images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def vit(pool: str = "avg"):
    """A small random DeiT-Ti (64 px, 8 px patches: 64 patch tokens), attention sharpened so
    images keep different counts."""
    return make_vit("deit_tiny_patch16_224", img_size=64, patch_size=8, global_pool=pool)


@pytest.mark.parametrize("reducer, k", REDUCERS)
@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_cached_features_pool_with_their_own_weights(reducer, k, pool):
    """f1 = forward_features(x1); forward_features(x2); forward_head(f1): f1 pools as x1's forward
    left it, not as the later forward did."""
    model = ats_vit.apply(vit(pool), num_tokens=k, reducer=reducer)
    x1, x2 = images(3, seed=1), images(3, seed=2)
    with torch.no_grad():
        want = model(x1)
        f1 = model.forward_features(x1)
        model.forward_features(x2)
        got = model.forward_head(f1)
    assert torch.equal(got, want)


def test_threads_sharing_a_model_see_their_own_forwards():
    """Thread A's forward is stopped between its blocks and its pooling (a hook on the final
    norm) while thread B runs a whole forward of other images on the same model: A's logits and
    statistics are still A's alone, B's are B's."""
    model = ats_vit.apply(vit("avg"), reducer="tome", num_tokens=0.6)
    xa, xb = images(2, seed=3), images(4, seed=4)
    with torch.no_grad():
        (alone_a, stats_a), (alone_b, stats_b) = (ats_vit.forward_with_stats(model, x) for x in (xa, xb))
    kept_a, kept_b = stats_a.num_kept, stats_b.num_kept
    results = {}

    def run_b():
        with torch.no_grad():
            results["b"] = model(xb)
        results["b_kept"] = ats_vit.last_stats(model).num_kept

    def interleave(module, inputs):
        if threading.current_thread().name == "A" and "b" not in results:
            other = threading.Thread(target=run_b, name="B")
            other.start()
            other.join()  # B's whole forward runs here, inside A's

    def run_a():
        with torch.no_grad():
            results["a"] = model(xa)
        results["a_kept"] = ats_vit.last_stats(model).num_kept

    handle = model.norm.register_forward_pre_hook(interleave)
    try:
        thread = threading.Thread(target=run_a, name="A")
        thread.start()
        thread.join()
    finally:
        handle.remove()
    assert "b" in results, "the interleaving did not happen"
    assert torch.equal(results["a"], alone_a) and torch.equal(results["b"], alone_b)
    assert torch.equal(results["a_kept"], kept_a) and torch.equal(results["b_kept"], kept_b)
    assert torch.equal(ats_vit.last_stats(model).num_kept, kept_b)  # this thread's last forward: xb


def _hosts():
    yield "timm", vit("token"), images
    for kind in ("vit", "cvt"):
        yield f"hf-{kind}", make_hf(kind), (lambda n, kind=kind: images(n, image_size(kind)))


@pytest.mark.parametrize("mode", ["packed", "padded"])
@pytest.mark.parametrize("reducer, k", REDUCERS)
def test_inference_mode_equals_no_grad_in_every_host(mode, reducer, k, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the native kernels' workers run only with 2+ intra-op threads
    try:
        for host, model, make in _hosts():
            if host == "hf-cvt" and reducer != "ats":
                continue  # CvT takes ATS only
            ats_vit.apply(model, num_tokens=k, reducer=reducer, mode=mode)
            for n in (1, 2, 16):
                x = make(n)
                call = (lambda: model(x)) if host == "timm" else (lambda: model(pixel_values=x).logits)
                with torch.no_grad():
                    want = call()
                with torch.inference_mode():
                    got = call()
                assert torch.equal(got, want), (host, n)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("host", ["timm", "hf-vit"])
def test_a_patched_model_pickles_and_unpickles_patched(host):
    model = ats_vit.apply(vit("avg"), reducer="tome", num_tokens=0.6) if host == "timm" else \
        ats_vit.apply(make_hf("vit"), blocks=[1, 2, 3], num_tokens=20)
    x = images(3, 64 if host == "timm" else image_size("vit"))
    run = (lambda m: m(x)) if host == "timm" else (lambda m: m(pixel_values=x).logits)
    with torch.no_grad():
        want = run(model)
    stats = ats_vit.last_stats(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__name__ == type(model).__name__ and ats_vit.is_patched(loaded)
    with pytest.raises(ValueError, match="no forward has run"):
        ats_vit.last_stats(loaded)  # a forward's record does not travel with the model
    with torch.no_grad():
        assert torch.equal(run(loaded), want)
    assert torch.equal(ats_vit.last_stats(loaded).num_kept, stats.num_kept)
    plain = run(ats_vit.remove(copy.deepcopy(loaded)))
    assert not torch.equal(plain, want)  # the copy is patched too, and removes like the original


def test_tracers_that_cannot_record_ats_refuse_in_one_clear_error():
    model = ats_vit.apply(vit("token"))
    x = images(2)
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record a model with ATS applied"):
        torch.jit.trace(model, x)
    with pytest.raises(RuntimeError, match="torch.export does not support a model with ATS applied"):
        torch.export.export(model, (x,))


@pytest.mark.slow  # inductor compiles on the 2-core CPU
@pytest.mark.parametrize("dynamic", [None, True])
def test_inductor_compile_serves_every_batch_size_between_eager_calls(dynamic):
    model = ats_vit.apply(make_vit("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=5), blocks=[2, 3, 4])
    compiled = torch.compile(model, dynamic=dynamic)
    with torch.no_grad():
        for n in (4, 4, 8, 1):
            x = images(n, 32, seed=n)
            got = compiled(x)
            kept = ats_vit.last_stats(model).num_kept
            want = model(x)  # an eager call between compiled ones
            assert torch.allclose(got, want, atol=1e-5, rtol=0), n
            assert torch.equal(kept, ats_vit.last_stats(model).num_kept)


@pytest.mark.slow  # a subprocess that loads torch and a data set
def test_ctrl_c_during_eval_is_one_line_and_code_130(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "ats_vit", "eval", "--blocks", "3-11", "--workers", "0",
                                "--batch-size", "16", "--out", str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in iter(process.stdout.readline, ""):  # wait until it is evaluating (its first row)
        if "dense: top-1" in line or time.time() > deadline:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "ats-vit: interrupted"
    assert not (tmp_path / "results.json").exists()
