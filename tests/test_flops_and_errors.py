import copy

import pytest
import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ats_vit
from reference import make_vit


def counted_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates torch's own FLOP counter sees (it counts 2 FLOPs per MAC).

    The math backend of scaled_dot_product_attention, since the counter does not see inside
    the fused CPU kernel."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name,kwargs,size", [
    ("deit_small_patch16_224", {}, 224),
    ("deit_tiny_patch16_224", {"img_size": 96}, 96),
    ("deit_small_distilled_patch16_224", {"img_size": 64}, 64),
    ("vit_small_patch16_224", {"reg_tokens": 4, "img_size": 64}, 64),
    ("deit3_small_patch16_224", {"img_size": 64}, 64),
])
def test_dense_formula_matches_torch_flop_counter(name, kwargs, size):
    model = timm.create_model(name, **kwargs).eval()
    n = (size // 16) ** 2
    assert ats_vit.cost_model(model).dense_macs(n, model.num_prefix_tokens) == counted_macs(model, torch.randn(1, 3, size, size))


def test_dense_deit_small_is_4_6_gmacs():
    model = timm.create_model("deit_small_patch16_224").eval()
    assert round(ats_vit.cost_model(model).dense_macs(196, 1) / 1e9, 1) == 4.6


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sampler", ["inverse_transform", "topk"])
def test_per_image_gmacs_equal_what_torch_counts_on_that_image(fused, sampler):
    model = make_vit("deit_small_patch16_224", img_size=96)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    ats_vit.apply(model, blocks=[2, 5, 9], num_tokens=[30, 0.5, 8], sampler=sampler)
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        model(x)
    batch_stats = ats_vit.last_stats(model)
    assert len(set(batch_stats.gmacs.tolist())) > 1 or sampler == "topk"
    for b in range(3):
        macs = counted_macs(model, x[b:b + 1])  # one image: no padding, so torch sees its true cost
        stats = ats_vit.last_stats(model)
        assert stats.gmacs[0].item() * 1e9 == pytest.approx(macs, abs=0.5)
        assert stats.gmacs[0].item() == pytest.approx(batch_stats.gmacs[b].item(), rel=1e-12)
        assert stats.gmacs[0] < stats.dense_gmacs
    assert batch_stats.dense_gmacs * 1e9 == ats_vit.cost_model(model).dense_macs(36, 1)
    assert torch.allclose(batch_stats.reduction, 1 - batch_stats.gmacs / batch_stats.dense_gmacs)


def test_stats_layout():
    model = ats_vit.apply(make_vit("deit_small_patch16_224", img_size=64), blocks=[3, 8])
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    stats = ats_vit.last_stats(model)
    assert stats.blocks == (3, 8) and stats.num_patches == 16
    assert stats.num_kept.shape == (4, 2) and stats.tokens.shape == (4, 13)
    assert (stats.tokens[:, :4] == 17).all()
    assert torch.equal(stats.tokens[:, 4] - 1, stats.num_kept[:, 0])
    for b in range(4):
        first, second = stats.kept_positions(b, 3), stats.kept_positions(b, 8)
        assert len(first) == stats.num_kept[b, 0] and set(second) <= set(first)
    with pytest.raises(ValueError, match="block must be one of"):
        stats.kept_positions(0, 4)


def fresh():
    return timm.create_model("deit_tiny_patch16_224", img_size=64).eval()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(blocks=[12]), ValueError, r"0\.\.11"),
    (dict(blocks=[-1]), ValueError, r"0\.\.11"),
    (dict(blocks=[3, 3]), ValueError, "duplicates"),
    (dict(blocks=["3"]), ValueError, "blocks contains"),
    (dict(blocks=3.0), TypeError, "blocks must be"),
    (dict(num_tokens=0), ValueError, "num_tokens must be >= 1"),
    (dict(num_tokens=1.5), ValueError, r"\(0, 1\]"),
    (dict(num_tokens=0.0), ValueError, r"\(0, 1\]"),
    (dict(num_tokens=True), TypeError, "num_tokens"),
    (dict(num_tokens="all"), TypeError, "num_tokens"),
    (dict(blocks=[3, 4], num_tokens=[10]), ValueError, "one per ATS block"),
    (dict(num_tokens=[10] * 8 + [0]), ValueError, "num_tokens must be >= 1"),
    (dict(sampler="gumbel"), ValueError, "sampler must be one of"),
    (dict(mode="nested"), ValueError, "mode must be one of"),
])
def test_bad_arguments_leave_the_model_untouched(kwargs, error, match):
    model = fresh()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    cls = type(model)
    with pytest.raises(error, match=match):
        ats_vit.apply(model, **kwargs)
    assert type(model) is cls and not ats_vit.is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_applied_twice_and_remove_unpatched():
    model = ats_vit.apply(fresh())
    with pytest.raises(ValueError, match="already applied"):
        ats_vit.apply(model, blocks=[5])
    assert ats_vit.remove(model) is model
    with pytest.raises(ValueError, match="not patched"):
        ats_vit.remove(model)
    with pytest.raises(ValueError, match="not patched"):
        ats_vit.last_stats(model)


def test_last_stats_before_any_forward():
    with pytest.raises(ValueError, match="no forward"):
        ats_vit.last_stats(ats_vit.apply(fresh()))


@pytest.mark.parametrize("build,error,match", [
    (lambda: nn.Linear(3, 3), TypeError, "VisionTransformer"),
    (lambda: timm.create_model("vit_small_patch16_224", class_token=False, global_pool="avg", img_size=64),
     ValueError, "class token"),
    (lambda: timm.create_model("vit_small_patch16_224", global_pool="map", img_size=64), ValueError, "global_pool"),
    (lambda: timm.create_model("vit_small_patch16_224", patch_drop_rate=0.2, img_size=64), ValueError, "patch dropout"),
    (lambda: timm.create_model("vit_small_patch16_224", block_fn=timm.models.vision_transformer.ResPostBlock,
                               img_size=64), TypeError, "ResPostBlock"),
    (lambda: timm.create_model("vit_base_r26_s32_224", img_size=64), TypeError, "patch_embed"),
])
def test_unsupported_models_are_refused(build, error, match):
    model = build()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        ats_vit.apply(model)
    assert not ats_vit.is_patched(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_forward_with_attn_mask_or_intermediates_is_refused():
    model = ats_vit.apply(fresh())
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 64, 64), attn_mask=torch.ones(1, 1, 17, 17, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="forward_intermediates"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64))


def test_registered_sampler_is_used_by_name():
    calls = []

    def every_other(scores, k):
        calls.append(scores.shape)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[:, ::2] = True
        return ats_vit.core.sampling.keep_mask_to_index(keep)

    ats_vit.register_sampler("every_other_test", every_other)
    assert "every_other_test" in ats_vit.list_samplers()
    with pytest.raises(ValueError, match="already registered"):
        ats_vit.register_sampler("every_other_test", every_other)
    model = ats_vit.apply(fresh(), blocks=[4], sampler="every_other_test")
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert calls == [(2, 16)]
    assert ats_vit.last_stats(model).kept_positions(1, 4) == list(range(0, 16, 2))
