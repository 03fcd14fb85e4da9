import json

import pytest
import torch

import ats_vit
from ats_vit.jobs.bench import BOUND_LABEL, TokenCountBound
from ats_vit.jobs.timing import interleaved_times, peak_forward_bytes, range_share
from conftest import one_error_line, run
from reference import make_vit


GROUP = 6  # dense, ATS packed, ATS padded, top-K, ToMe, bound


def test_bench_bundled_model_reports_every_column(tmp_path, capsys):
    code, out, err = run(["bench", "--case", "bundled", "--batch-sizes", "1,3", "--dtypes", "float32,bfloat16",
                          "--warmup", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * GROUP  # dtypes x batch sizes x methods
    for r in rows:
        assert r["runs"] == 10 and r["images_per_s"] > 0 and r["peak_mb"] > 0
        assert r["realisation"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
        assert r["ideal_speedup"] == pytest.approx(rows[0]["gmacs"] / r["gmacs"])
        if r["method"] != "dense":
            assert len(r["tokens_per_ats_block"]) == 9 and r["gmacs"] < rows[0]["gmacs"]
        if r["method"].startswith(("ATS", "top-K")):
            assert 0 < r["selection_share"] < 1
    packed = [r for r in rows if r["method"].endswith("packed")]
    padded = [r for r in rows if r["method"].endswith("padded")]
    assert [r["gmacs"] for r in packed] == [r["gmacs"] for r in padded]  # same images, same tokens
    for r in rows:
        assert r["latency_p90_ms"] >= r["latency_ms"] > 0
        assert r["latency_ms"] == pytest.approx(1000 * r["batch"] / r["images_per_s"])
    for group in (rows[i:i + GROUP] for i in range(0, len(rows), GROUP)):
        dense, ats, _, topk, tome, bound = group
        assert [r["method"] for r in group[3:5]] == ["top-K 3-11 at ATS's GMACs", "ToMe 3-11 at ATS's GMACs"]
        assert group[5]["method"] == BOUND_LABEL and bound["selection_share"] == 0
        for r in group[1:3]:
            assert r["of_bound"] == pytest.approx(r["realisation"] / bound["realisation"])
        assert not any("of_bound" in r for r in (dense, topk, tome, bound))
        for rival in (topk, tome):  # matched on the first images' mean GMACs; ToMe's steps are whole tokens
            assert rival["gmacs"] == pytest.approx(packed[-1]["gmacs"], rel=0.05)
    assert "realisation" in out and "ATS / bound" in out and "p90 ms" in out


def test_bench_deit_s_case_cuts_dense_gmacs_by_the_reduction(tmp_path, capsys):
    """DeiT-S shape at 224 (random weights): dense GMACs as torch's flop counter counts them, and
    ATS's budget at --reduction of them."""
    import timm
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    code, out, err = run(["bench", "--case", "deit_s", "--batch-sizes", "1", "--dtypes", "float32", "--rivals",
                          "none", "--reduction", "0.3", "--warmup", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    dense, packed, padded, bound = json.loads((tmp_path / "bench.json").read_text())["rows"]
    with torch.device("meta"):
        model = timm.create_model("deit_small_patch16_224")
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.empty(1, 3, 224, 224, device="meta"))
    assert dense["gmacs"] == pytest.approx(counter.get_total_flops() / 2e9, rel=1e-6)
    assert packed["gmacs"] == pytest.approx(0.7 * dense["gmacs"], rel=0.02)
    assert packed["method"] == "ATS 3-11 -30.0% packed" and len(packed["tokens_per_ats_block"]) == 9
    assert bound["method"] == BOUND_LABEL


@pytest.mark.parametrize("args,match", [(["--repeats", "5"], "--repeats"), (["--dtypes", "float16x"], "--dtypes"),
                                        (["--case", "resnet"], "--case"), (["--rivals", "evit"], "--rivals")])
def test_bench_bad_input(args, match, capsys):
    code, _, err = run(["bench", "--batch-sizes", "1", *args], capsys)
    assert code == 2 and match in err and one_error_line(err)


def test_token_count_bound_runs_each_block_on_the_counts_and_counts_its_macs():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = make_vit("deit_tiny_patch16_224", img_size=64)  # 16 patches + the class token
    counts = torch.tensor([[17, 17, 17, 17, 12, 12, 9, 9, 9, 5, 5, 5, 5]])
    bound = TokenCountBound(model, counts)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1])) for blk in model.blocks]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        bound(x)
    for hook in hooks:
        hook.remove()
    assert seen == counts[0, 1:].tolist()
    assert bound.gmacs() * 1e9 == counter.get_total_flops() // 2


def test_peak_memory_grows_with_batch():
    model = make_vit("deit_tiny_patch16_224", img_size=64)
    small = peak_forward_bytes(model, torch.randn(1, 3, 64, 64))
    large = peak_forward_bytes(model, torch.randn(8, 3, 64, 64))
    assert 0 < small < large


def test_range_share_is_the_time_inside_the_named_ranges():
    import time
    from torch.profiler import record_function

    class Half(torch.nn.Module):
        def forward(self, x):
            with record_function("inside"):
                time.sleep(0.03)
            time.sleep(0.03)
            return x

    assert range_share(Half(), torch.zeros(1), "inside") == pytest.approx(0.5, abs=0.1)
    assert range_share(Half(), torch.zeros(1), "elsewhere") == 0

    class FirstCallInside(torch.nn.Module):  # one outlier forward among the rounds
        calls = 0

        def forward(self, x):
            self.calls += 1
            with record_function("inside"):
                time.sleep(0.03 if self.calls > 1 else 0.3)
            time.sleep(0.03)
            return x

    assert range_share(FirstCallInside(), torch.zeros(1), "inside", rounds=5) == pytest.approx(0.5, abs=0.1)


def test_interleaved_times_call_each_function_once_per_round():
    calls = []
    times = interleaved_times([lambda: calls.append("a"), lambda: calls.append("b")], torch.device("cpu"),
                              warmup=1, repeats=10)
    assert calls == ["a", "b"] * 11 and [len(t) for t in times] == [10, 10]


def test_compare_throughput_rounds_run_every_image_in_forwards_of_the_batch_size(monkeypatch):
    """At batch_size 2 a round of 6 images is 3 forwards of 2 (each image's own cost is timed); img/s
    is the images over the median round, the latencies are per forward, the speed-up paired."""
    from ats_vit.jobs import timing
    seen = []
    clock = iter(range(1000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: float(next(clock)))  # every call: one second
    fast = lambda x: seen.append(("fast", len(x)))
    speeds = timing.compare_throughput([fast, fast], torch.zeros(6, 1), warmup=1, repeats=3, batch_size=2)
    assert seen == [("fast", 2)] * (3 * 2 * (1 + 3))
    for speed in speeds:
        assert speed.images_per_s == pytest.approx(6 / 3) and speed.speedup == pytest.approx(1.0)
        assert speed.median_ms == pytest.approx(1000.0) and speed.p90_ms == pytest.approx(1000.0)


def test_torch_compile_gives_the_same_outputs():
    model = ats_vit.apply(make_vit("deit_small_patch16_224", img_size=64), num_tokens=0.8)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager")(x)
    assert torch.allclose(eager, compiled, atol=1e-5)
    assert ats_vit.last_stats(model).num_kept.shape == (4, 9)


@pytest.mark.slow  # over 10 s on the 2-core CPU
def test_bench_compile_times_the_compiled_models(tmp_path, capsys, monkeypatch):
    """--compile runs every timed model through torch.compile (here with a recording backend,
    not inductor, to stay fast): each one is compiled and its graphs are what runs."""
    compiled, graphs = [], []
    real_compile = torch.compile

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def recording_compile(model):
        compiled.append(model)
        return real_compile(model, backend=backend)

    monkeypatch.setattr(torch, "compile", recording_compile)
    code, _, err = run(["bench", "--case", "bundled", "--batch-sizes", "2", "--dtypes", "float32", "--rivals", "none",
                        "--compile", "--warmup", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["machine"]["compile"] is True
    assert len(compiled) == len(result["rows"]) == 4  # dense, packed, padded, bound
    assert len(graphs) >= 4
