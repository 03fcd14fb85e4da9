import copy

import pytest
import torch

import ats_vit
from reference import make_vit, reference_forward, slow_its, slow_topk


def images(n: int, size: int = 96, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def deit_s64():
    """DeiT-S shaped (12 blocks, 384 wide, 6 heads, 196 patches at 224 px) in float64."""
    return make_vit("deit_small_patch16_224").double()


def patched(model, **kwargs):
    return ats_vit.apply(copy.deepcopy(model), **kwargs)


@pytest.mark.parametrize("num_tokens", [None, 40])
def test_matches_slow_reference_per_image(deit_s64, num_tokens):
    x = images(3, 224, dtype=torch.float64)
    model = patched(deit_s64, num_tokens=num_tokens)
    with torch.no_grad():
        logits = model(x)
    stats = ats_vit.last_stats(model)
    assert len(set(stats.num_kept[:, -1].tolist())) > 1, "images should keep different counts"
    for b in range(3):
        with torch.no_grad():
            ref_logits, ref_kept = reference_forward(deit_s64, x[b:b + 1], range(3, 12), num_tokens)
        assert torch.allclose(logits[b], ref_logits, atol=1e-9, rtol=0)
        for block, kept in ref_kept.items():
            assert stats.kept_positions(b, block) == kept
        assert stats.num_kept[b].tolist() == [len(ref_kept[i]) for i in range(3, 12)]


def test_topk_sampler_matches_slow_reference(deit_s64):
    x = images(2, 224, dtype=torch.float64)
    model = patched(deit_s64, blocks=[4, 7], num_tokens=[100, 50], sampler="topk")
    with torch.no_grad():
        logits = model(x)
        for b in range(2):
            budgets = iter([100, 50])  # K of block 4, then of block 7
            ref_logits, _ = reference_forward(deit_s64, x[b:b + 1], [4, 7], None,
                                              rule=lambda s, _k: slow_topk(s, next(budgets)))
            assert torch.allclose(logits[b], ref_logits, atol=1e-9, rtol=0)
    assert ats_vit.last_stats(model).num_kept.tolist() == [[100, 50], [100, 50]]


def test_ats_blocks_that_drop_nothing_equal_the_dense_model():
    dense = make_vit("deit_small_patch16_224", img_size=96)
    x = images(4)
    with torch.no_grad():
        expected = dense(x)
        model = patched(dense, blocks=list(range(12)), sampler="topk")
        out = model(x)
    assert (ats_vit.last_stats(model).num_kept == 36).all()
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)


def test_remove_restores_exact_outputs_and_state_dict_is_untouched():
    model = make_vit("deit_small_patch16_224", img_size=96)
    x = images(3)
    with torch.no_grad():
        before = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    cls = type(model)
    ats_vit.apply(model, num_tokens=0.5)
    assert ats_vit.is_patched(model)
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    model.load_state_dict(keys)  # a checkpoint loads the same
    with torch.no_grad():
        assert not torch.allclose(model(x), before, atol=1e-3)
    ats_vit.remove(model)
    assert type(model) is cls and not ats_vit.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


@pytest.fixture(params=[2, 16], ids=["grouped-attention", "one-attention-call"])
def attention_group(request, monkeypatch):
    """Images per packed attention call: 2 splits a batch of 6 into groups of their own lengths
    (grouping forced, whatever it saves)."""
    import ats_vit.core.block as block
    calls = []
    sdpa = block.sdpa
    monkeypatch.setattr(block, "ATTENTION_GROUP", request.param)
    monkeypatch.setattr(block, "GROUPING_MIN_SAVING", -1.0)
    monkeypatch.setattr(block, "sdpa", lambda *a: calls.append(a[0].shape) or sdpa(*a))
    return request.param, calls


@pytest.mark.parametrize("mode", ["packed", "padded"])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_batch_independence(pool, mode, attention_group):
    model = patched(make_vit("deit_small_patch16_224", img_size=96, global_pool=pool), num_tokens=0.9, mode=mode)
    x = images(6)
    with torch.no_grad():
        batch = model(x)
        counts = ats_vit.last_stats(model).num_kept
        assert len(set(counts[:, -1].tolist())) > 1, "the batch must be padded for this test to mean anything"
        for b in range(6):
            alone = model(x[b:b + 1])
            assert torch.equal(ats_vit.last_stats(model).num_kept[0], counts[b])
            assert (alone[0] - batch[b]).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["packed", "padded"])
@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_pooled_heads_match_the_per_image_reference(pool, mode):
    """timm's own forward_head on each image's kept tokens alone (tests/reference.py) against
    the patched batch, whose padding must take no part in the average or the maximum."""
    base = make_vit("deit_small_patch16_224", img_size=96, global_pool=pool).double()
    x = images(4, 96, dtype=torch.float64)
    model = patched(base, num_tokens=20, mode=mode)
    with torch.no_grad():
        batch = model(x)
        assert len(set(ats_vit.last_stats(model).num_kept[:, -1].tolist())) > 1, "the batch must be padded"
        for b in range(4):
            want, _ = reference_forward(base, x[b:b + 1], range(3, 12), 20)
            assert (batch[b] - want.reshape(-1)).abs().max() <= 1e-9, b


def reference_varlen(calls: list):
    """flash varlen attention's stand-in on the CPU: each image's queries over its own keys by
    SDPA, checking the bookkeeping (int32 cumulative lengths, maxima) and recording the batch."""
    import torch.nn.functional as F

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        cq, ck = cu_q.tolist(), cu_k.tolist()  # (tolist reads without a dispatched op)
        calls.append(len(cq) - 1)
        assert max_q == max(b - a for a, b in zip(cq, cq[1:])) and max_k == max(b - a for a, b in zip(ck, ck[1:]))
        assert cu_q.dtype == cu_k.dtype == torch.int32 and cq[-1] == len(q) and ck[-1] == len(k)
        return torch.cat([F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:e].transpose(0, 1),
                                                         v[c:e].transpose(0, 1), scale=scale).transpose(0, 1)
                          for a, b, c, e in zip(cq, cq[1:], ck, ck[1:])])
    return kernel


def test_variable_length_attention_equals_the_padded_layout(monkeypatch):
    """The packed layout's attention without padding (flash attention's varlen kernel, CUDA
    only): its bookkeeping (flat rows, cumulative lengths, longest sequences) checked on the CPU
    with a per-image reference kernel in the kernel's place, against the released padded layout."""
    import ats_vit.core.block as block

    calls = []
    monkeypatch.setattr(block, "varlen_attn", reference_varlen(calls))
    monkeypatch.setattr(block, "VARLEN_DEVICES", ("cuda", "cpu"))
    base = make_vit("deit3_small_patch16_224", img_size=96)
    x = images(6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the kernel takes half precision
        varlen = patched(base, num_tokens=0.9, blocks=[3, 5, 8], mode="packed")
        out = varlen(x)
        assert len(set(ats_vit.last_stats(varlen).num_kept[:, -1].tolist())) > 1, "the batch must be padded"
        kept = ats_vit.last_stats(varlen).num_kept
        assert calls == [6] * 9  # ATS blocks 3, 5, 8 and the dense blocks after the first (those before hold no padding)
        monkeypatch.setattr(block, "VARLEN_DEVICES", ())
        padded = patched(base, num_tokens=0.9, blocks=[3, 5, 8], mode="padded")
        reference = padded(x)
    assert torch.equal(ats_vit.last_stats(padded).num_kept, kept)
    assert (out.float() - reference.float()).abs().max() <= 0.05 * reference.float().abs().max()


def test_packed_inference_on_the_cpu_attends_without_padding_and_training_pads():
    """On the CPU a packed batch's inference runs the native variable-length kernel in each of
    the 9 ATS blocks (3-11), with the padded layout's logits; a forward that needs gradients pads
    (the kernel has no backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.varlen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.varlen += func is torch.ops.ats_vit.varlen_attention.default
            return func(*args, **(kwargs or {}))

    base = make_vit("deit3_small_patch16_224", img_size=96)
    x = images(6, dtype=torch.float64)
    packed = patched(base, num_tokens=0.9, mode="packed").double()
    padded = patched(base, num_tokens=0.9, mode="padded").double()
    with torch.no_grad(), Calls() as calls:
        out = packed(x)
    assert len(set(ats_vit.last_stats(packed).num_kept[:, -1].tolist())) > 1, "the batch must be padded"
    assert calls.varlen == 9
    with torch.no_grad():
        assert (out - padded(x)).abs().max() <= 1e-10
    with Calls() as calls:
        packed(x)
    assert calls.varlen == 0


def test_off_the_cpu_the_bookkeeping_reads_the_device_once_per_ats_block(monkeypatch):
    """On an accelerator every read of a device value waits for the device. The path a GPU takes
    (selection in PyTorch operations, samplers that keep a width known from the shapes, flash
    varlen attention) is run on the CPU with the CPU's exemptions switched off: in the whole
    forward the only reads are one per ATS block (host_values), no op that syncs on CUDA runs
    (item, nonzero, boolean indexing), and the picks and logits equal the CPU path's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import ats_vit.core.block as block
    import ats_vit.core.sampling as sampling
    import ats_vit.core.tokens as tokens
    from ats_vit.core import native

    syncing = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.is_nonzero.default}

    class Syncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            bool_index = func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if func in syncing or bool_index:
                self.seen.append(func)
            return func(*args, **(kwargs or {}))

    base = make_vit("deit3_small_patch16_224", img_size=96)
    x = images(6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu = patched(base, num_tokens=40, blocks=[3, 5, 8], mode="packed")
        want = cpu(x)
    reads = []
    monkeypatch.setattr(block, "varlen_attn", reference_varlen([]))
    monkeypatch.setattr(block, "VARLEN_DEVICES", ("cpu",))
    monkeypatch.setattr(sampling, "HOST_DEVICES", ())
    monkeypatch.setattr(native, "available", lambda: False)
    for module in (sampling, tokens):
        monkeypatch.setattr(module, "host_values", lambda t, real=tokens.host_values: reads.append(t) or real(t))
    device_path = patched(base, num_tokens=40, blocks=[3, 5, 8], mode="packed")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Syncs() as syncs:
        out = device_path(x)
    assert syncs.seen == [] and len(reads) == 3
    stats, want_stats = ats_vit.last_stats(device_path), ats_vit.last_stats(cpu)
    assert len(set(stats.num_kept[:, 0].tolist())) > 1, "the batch must be padded"
    assert all(torch.equal(a, b) for a, b in zip(stats.positions, want_stats.positions))
    assert (out.float() - want.float()).abs().max() <= 0.05 * want.float().abs().max()


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_packed_and_padded_modes_agree(pool, attention_group):
    group, calls = attention_group
    base = make_vit("deit3_small_patch16_224", img_size=96, global_pool=pool)
    x = images(6)
    logits, stats, grads, batches = {}, {}, {}, {}
    for mode in ("packed", "padded"):
        model = patched(base, num_tokens=0.9, mode=mode).train()
        calls.clear()
        logits[mode] = model(x)
        batches[mode] = {shape[0] for shape in calls}
        logits[mode].square().mean().backward()
        stats[mode] = ats_vit.last_stats(model)
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    assert len(set(stats["packed"].num_kept[:, -1].tolist())) > 1, "the batch must be padded"
    assert batches["padded"] == {6}  # the released behaviour: one call over the padded batch
    assert batches["packed"] == ({6, 2} if group == 2 else {6})
    assert (logits["packed"] - logits["padded"]).abs().max() <= 1e-5
    assert torch.equal(stats["packed"].num_kept, stats["padded"].num_kept)
    assert torch.equal(stats["packed"].gmacs, stats["padded"].gmacs)
    assert all(torch.equal(a, b) for a, b in zip(stats["packed"].positions, stats["padded"].positions))
    for name, grad in grads["packed"].items():
        assert torch.allclose(grad, grads["padded"][name], atol=1e-5, rtol=1e-4), name


def test_packed_mode_trains_with_drop_path_per_image():
    model = patched(make_vit("deit_small_patch16_224", img_size=64, drop_path_rate=0.5), num_tokens=0.6).train()
    x = images(8, 64)
    torch.manual_seed(0)
    model(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a dropped residual branch adds nothing for that image: with every branch dropped, the
    # output no longer depends on any block weights
    for module in model.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.999999
    model.zero_grad()
    model(x).sum().backward()
    assert model.blocks[8].mlp.fc1.weight.grad is None or model.blocks[8].mlp.fc1.weight.grad.abs().max() == 0


VARIANTS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "deit_small": ("deit_small_patch16_224", {}),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "registers": ("vit_small_patch16_224", {"reg_tokens": 4}),
    "avg_pool_with_class_token": ("vit_small_patch16_224", {"global_pool": "avg", "class_token": True}),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_reference(variant, fused):
    name, kwargs = VARIANTS[variant]
    base = make_vit(name, img_size=64, **kwargs).double()
    for blk in base.blocks:
        blk.attn.fused_attn = fused
    model = patched(base, num_tokens=0.8)
    x = images(2, 64, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    P = base.num_prefix_tokens
    stats = ats_vit.last_stats(model)
    assert (stats.tokens[:, -1] < stats.tokens[:, 0]).all()
    assert feats.shape[1] == P + int(stats.num_kept[:, -1].max())
    for b in range(2):
        with torch.no_grad():
            ref, kept = reference_forward(base, x[b:b + 1], range(3, 12), None,
                                          rule=lambda s, _k: slow_its(s, max(1, round(0.8 * len(s)))))
        assert torch.allclose(logits[b], ref, atol=1e-9, rtol=0)
        assert stats.kept_positions(b, 11) == kept[11]


def test_dynamic_img_size_at_other_resolution():
    """80 x 128 px on a model made for 96: 5 x 8 patches, position embeddings resized by timm;
    each image's logits and kept positions against the slow reference at that size."""
    base = make_vit("deit_small_patch16_224", img_size=96, dynamic_img_size=True).double()
    model = patched(base)
    x = torch.randn(2, 3, 80, 128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        stats = ats_vit.last_stats(model)
        assert out.shape == (2, 1000) and stats.num_patches == 5 * 8
        assert (stats.num_kept[:, 0] < 40).all()
        for b in range(2):
            want, kept = reference_forward(base, x[b:b + 1], range(3, 12), None)
            assert (out[b] - want.reshape(-1)).abs().max() <= 1e-9
            assert stats.kept_positions(b, 3) == kept[3] and stats.kept_positions(b, 11) == kept[11]


def test_training_gradients_match_reference(deit_s64):
    x = images(2, 224, dtype=torch.float64)
    model = patched(deit_s64, num_tokens=60)
    model.train()
    model(x).logsumexp(-1).sum().backward()
    ref_model = copy.deepcopy(deit_s64).train()
    sum(reference_forward(ref_model, x[b:b + 1], range(3, 12), 60)[0].logsumexp(-1) for b in range(2)).backward()
    for name in ["blocks.5.attn.qkv.weight", "blocks.5.attn.proj.weight", "blocks.11.mlp.fc1.weight",
                 "blocks.0.attn.qkv.weight", "cls_token"]:
        got = dict(model.named_parameters())[name].grad
        want = dict(ref_model.named_parameters())[name].grad
        assert got.abs().sum() > 0
        assert torch.allclose(got, want, atol=1e-9, rtol=1e-7), name


def test_gradient_checkpointing_checkpoints_every_block_and_keeps_the_gradients(monkeypatch):
    import ats_vit.hosts.patch as patch_module

    calls = []
    real = patch_module.checkpoint
    monkeypatch.setattr(patch_module, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    base = make_vit("deit_small_patch16_224", img_size=64)
    x = images(3, 64)
    grads = []
    for ckpt in (False, True):
        calls.clear()
        model = patched(base, num_tokens=0.6).train()
        model.set_grad_checkpointing(ckpt)
        model(x).square().mean().backward()
        assert len(calls) == (len(model.blocks) if ckpt else 0)  # the flag is honoured, block by block
        grads.append(model.blocks[6].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_drop_path_drops_per_image_not_per_batch():
    """16 copies of one image in training: stochastic depth decided per image makes their
    outputs differ; decided once for the batch, all 16 would be equal. In eval all are equal."""
    model = patched(make_vit("deit_small_patch16_224", img_size=64, drop_path_rate=0.5), num_tokens=0.6)
    x = images(1, 64).expand(16, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    with torch.no_grad():
        train = model.train()(x)
        evaluated = model.eval()(x)
    assert len({tuple(row.tolist()) for row in train}) > 8
    assert torch.allclose(evaluated, evaluated[:1].expand_as(evaluated), atol=1e-5)


def test_selection_is_deterministic_in_training():
    model = patched(make_vit("deit_small_patch16_224", img_size=64), num_tokens=0.5).train()
    x = images(4, 64)
    model(x)
    first = [p.clone() for p in ats_vit.last_stats(model).positions]
    model(x)
    assert all(torch.equal(a, b) for a, b in zip(first, ats_vit.last_stats(model).positions))


def test_bfloat16_autocast_trains_without_nan():
    model = patched(make_vit("deit_small_patch16_224", img_size=64), num_tokens=0.5).train()
    x = images(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (ats_vit.last_stats(model).num_kept[:, -1] < 16).all()


def test_bfloat16_autocast_logits_match_float64_on_the_tokens_it_kept(deit_s64):
    """Under bfloat16 autocast each image's logits are those of the float64 reference run on the
    tokens the bfloat16 model kept, up to bfloat16's rounding (measured on the dense model: the
    ATS error may not exceed twice the dense model's own bfloat16 error)."""
    dense = copy.deepcopy(deit_s64).float()
    model = patched(dense, num_tokens=60)
    x = images(3, 224)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, dense_logits = model(x).double(), dense(x).double()
    with torch.no_grad():
        dense_error = (dense_logits - deit_s64(x.double())).abs().max()
    stats = ats_vit.last_stats(model)
    for b in range(3):
        recorded = iter([p for p in stats.kept_positions(b, block)] for block in range(3, 12))
        current = list(range(196))

        def replay(scores, k):  # keep exactly what the bfloat16 model kept, as indices into the current tokens
            nonlocal current
            wanted = next(recorded)
            keep = [current.index(p) for p in wanted]
            current = wanted
            return keep

        with torch.no_grad():
            want, _ = reference_forward(deit_s64, x[b:b + 1].double(), range(3, 12), 60, rule=replay)
        assert (logits[b] - want).abs().max() <= 2 * dense_error
    assert dense_error > 1e-3  # bfloat16 did round: the tolerance is not float32's
