"""ATS in Hugging Face transformers ViT, DeiT (with and without teacher) and CvT models."""
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForImageClassification, SwinConfig, SwinForImageClassification, ViTConfig
from transformers import ViTForMaskedImageModeling

import ats_vit
from conftest import one_error_line, run
from reference_hf import image_size, make_hf, reference_cvt_forward, reference_vit_forward

KINDS = ["vit", "deit", "deit_teacher", "cvt"]
# ATS layers and K per kind: ViT/DeiT layers 1-3 of 4 (64 patches), CvT last-stage layers 1-3 (36).
PLACES = {"vit": ([1, 2, 3], 24), "deit": ([1, 2, 3], 24), "deit_teacher": ([1, 3], 20), "cvt": ([1, 2, 3], 14)}


def images(kind: str, n: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    size = image_size(kind)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    """(kind, folder): a random-initialised model saved as a user saves a fine-tuned one."""
    folder = tmp_path_factory.mktemp(request.param)
    make_hf(request.param).save_pretrained(folder)
    return request.param, folder


def load(folder, dtype=torch.float32):
    return AutoModelForImageClassification.from_pretrained(folder).eval().to(dtype)


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_no_ats_block_equals_the_unpatched_model(saved):
    kind, folder = saved
    model = load(folder)
    x = images(kind, 3)
    expected = logits(model, x)
    ats_vit.apply(model, blocks=[])
    assert torch.allclose(logits(model, x), expected, atol=1e-5, rtol=0)
    stats = ats_vit.last_stats(model)
    assert torch.allclose(stats.gmacs, torch.full((3,), stats.dense_gmacs, dtype=torch.float64))


def test_remove_restores_outputs_and_keeps_the_state_dict(saved):
    kind, folder = saved
    model = load(folder)
    x = images(kind, 3)
    before = logits(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    blocks, k = PLACES[kind]
    ats_vit.apply(model, blocks=blocks, num_tokens=k)
    assert model.state_dict().keys() == state.keys()
    assert not torch.allclose(logits(model, x), before, atol=1e-3)
    ats_vit.remove(model)
    assert [type(m) for m in model.modules()] == classes and not ats_vit.is_patched(model)
    assert torch.equal(logits(model, x), before)


def test_matches_slow_reference_per_image(saved):
    kind, folder = saved
    model = load(folder, torch.float64)
    reference = reference_cvt_forward if kind == "cvt" else reference_vit_forward
    blocks, k = PLACES[kind]
    x = images(kind, 3, dtype=torch.float64)
    unpatched = load(folder, torch.float64)
    ats_vit.apply(model, blocks=blocks, num_tokens=k)
    out = logits(model, x)
    stats = ats_vit.last_stats(model)
    assert len(set(stats.num_kept[:, -1].tolist())) > 1, "images should keep different counts"
    assert (stats.num_kept < stats.num_patches).all()
    for b in range(3):
        with torch.no_grad():
            ref_logits, ref_kept = reference(unpatched, x[b:b + 1], blocks, k)
        assert torch.allclose(out[b], ref_logits, atol=1e-9, rtol=0)
        for block in blocks:
            assert stats.kept_positions(b, block) == ref_kept[block]


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_batch_independence(saved, mode):
    kind, folder = saved
    blocks, k = PLACES[kind]
    model = ats_vit.apply(load(folder), blocks=blocks, num_tokens=k, mode=mode)
    x = images(kind, 5, seed=2)
    batch = logits(model, x)
    counts = ats_vit.last_stats(model).num_kept[:, -1]
    assert len(set(counts.tolist())) > 1, "the batch must be padded for this test to mean anything"
    for b in range(5):
        alone = logits(model, x[b:b + 1])
        assert (alone[0] - batch[b]).abs().max() <= 1e-5
        assert ats_vit.last_stats(model).num_kept[0, -1] == counts[b]


def counted_macs(model, x) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(pixel_values=x)
    return counter.get_total_flops() // 2


def test_gmacs_equal_what_torch_counts_per_image(saved):
    kind, folder = saved
    model = load(folder)
    x = images(kind, 5, seed=2)
    dense = counted_macs(model, x[:1])
    blocks, k = PLACES[kind]
    ats_vit.apply(model, blocks=blocks, num_tokens=k)
    with torch.no_grad():
        model(pixel_values=x)
    batch = ats_vit.last_stats(model)
    assert batch.dense_gmacs * 1e9 == dense
    assert (batch.gmacs < batch.dense_gmacs).all() and len(set(batch.gmacs.tolist())) > 1
    for b in range(5):
        macs = counted_macs(model, x[b:b + 1])  # one image: no padding, so torch sees its true cost
        assert ats_vit.last_stats(model).gmacs[0].item() * 1e9 == pytest.approx(macs, abs=0.5)
        assert batch.gmacs[b].item() * 1e9 == pytest.approx(macs, abs=0.5)


def test_cvt_13_at_224_is_4_5_gmacs_and_defaults_to_stage_3_layers_1_to_9():
    from transformers import CvtConfig, CvtForImageClassification
    model = ats_vit.apply(CvtForImageClassification(CvtConfig()).eval())  # CvT-13's configuration
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 224, 224))
    stats = ats_vit.last_stats(model)
    assert stats.blocks == tuple(range(1, 10)) and stats.num_patches == 14 * 14
    assert round(stats.dense_gmacs, 1) == 4.6  # the CvT paper rounds 4.57 down to 4.5


def test_cvt_hidden_state_holds_kept_tokens_on_the_grid():
    model = ats_vit.apply(make_hf("cvt"), blocks=[1, 2, 3], num_tokens=10)
    with torch.no_grad():
        out = model.cvt(pixel_values=images("cvt", 2))
    stats = ats_vit.last_stats(model)
    grid = out.last_hidden_state  # (B, C, 6, 6)
    assert grid.shape[2:] == (6, 6) and out.cls_token_value.shape == (2, 1, 48)
    for b in range(2):
        filled = set(torch.nonzero(grid[b].abs().sum(0).flatten()).flatten().tolist())
        assert filled == set(stats.kept_positions(b, 3))


def test_deit_teacher_keeps_both_prefix_tokens():
    model = ats_vit.apply(make_hf("deit_teacher"), blocks=[1, 2, 3], num_tokens=5, sampler="topk")
    with torch.no_grad():
        out = model(pixel_values=images("deit_teacher", 2))
    stats = ats_vit.last_stats(model)
    assert (stats.num_kept == 5).all() and (stats.tokens[:, -1] == 7).all()
    assert out.cls_logits.shape == out.distillation_logits.shape == (2, 5)


def test_fine_tuning_gradients_flow_through_the_patched_model():
    model = ats_vit.apply(make_hf("vit").train(), blocks=[1, 2], num_tokens=0.5)
    out = model(pixel_values=images("vit", 4), labels=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def tiny_swin():
    return SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                 num_heads=[1, 1], window_size=2))


@pytest.mark.parametrize("build,error,match", [
    (tiny_swin, TypeError, "SwinForImageClassification is not supported; supported: CvtForImageClassification"),
    (lambda: ViTForMaskedImageModeling(ViTConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2,
                                                 num_attention_heads=3, intermediate_size=96)),
     TypeError, "ViTForMaskedImageModeling is not supported"),
    (lambda: make_hf("cvt"), ValueError, "supports reducer 'ats' with scorer 'cls_value' only"),
    (lambda: make_hf("vit"), ValueError, r"blocks contains 4; allowed: block indices in 0\.\.3"),
    (lambda: make_hf("vit"), ValueError, r"reducer must be one of \['ats', 'evit', 'tome'\], got 'dynamicvit'"),
])
def test_unsupported_models_and_options_are_refused(build, error, match):
    model = build()
    cls = type(model)
    kwargs = {"scorer": "cls"} if "scorer" in match else {"blocks": [4]} if "blocks" in match else \
        {"reducer": "dynamicvit"} if "dynamicvit" in match else {}
    with pytest.raises(error, match=match):
        ats_vit.apply(model, **kwargs)
    assert type(model) is cls and not ats_vit.is_patched(model)
    assert all(type(m).__name__[:3] != "ATS" for m in model.modules()) and not hasattr(model, "token_predictors")


@pytest.mark.parametrize("name", ["output_hidden_states", "output_attentions", "attention_mask", "bool_masked_pos"])
def test_forward_options_ats_cannot_honour_are_refused_while_patched(name):
    """Each would silently mean something else on the kept tokens."""
    model = ats_vit.apply(make_hf("vit"), blocks=[1])
    x = images("vit", 1)
    values = {"output_hidden_states": True, "output_attentions": True,
              "attention_mask": torch.ones(1, model.config.num_attention_heads, 65, 65),
              "bool_masked_pos": torch.zeros(1, 64, dtype=torch.bool)}
    with pytest.raises(ValueError, match=f"{name} is not supported while ATS is applied"):
        model(pixel_values=x, **{name: values[name]})


def test_timm_path_does_not_import_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import timm, torch, ats_vit\n"
            "m = ats_vit.apply(timm.create_model('deit_tiny_patch16_224', img_size=32).eval(), num_tokens=4,\n"
            "                 sampler='topk')\n"
            "m(torch.randn(1, 3, 32, 32)); print(ats_vit.last_stats(m).num_kept.tolist())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[4, 4, 4, 4, 4, 4, 4, 4, 4]]"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A transformers CvT classifier for 3 classes saved with its image processor, as a user saves
    a fine-tuned one."""
    from transformers import ConvNextImageProcessor, CvtConfig, CvtForImageClassification
    folder = tmp_path_factory.mktemp("hf_cvt")
    torch.manual_seed(0)
    CvtForImageClassification(CvtConfig(num_labels=3, embed_dim=[16, 32, 48], num_heads=[1, 2, 3],
                                         depth=[1, 2, 4])).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 96}, crop_pct=0.875).save_pretrained(folder)
    return folder


def test_eval_command_takes_a_transformers_folder(hf_folder, image_folder, tmp_path, capsys):
    code, stdout, err = run(["eval", "--model", f"hf:{hf_folder}", "--data", str(image_folder),
                             "--num-tokens", "0.5", "--workers", "0", "--timing-repeats", "1",
                             "--out", str(tmp_path)], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "results.json").read_text())
    dense, ats = result["rows"]
    assert result["meta"]["images"] == 9 and ats["blocks"] == [1, 2, 3]  # CvT's default: last-stage layers 1-9
    model = load(hf_folder)
    with torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 96, 96))  # the processor's 96 px crop
    assert dense["gmacs"] == pytest.approx(counted_macs(model, torch.zeros(1, 3, 96, 96)) / 1e9, abs=1e-5)
    assert ats["gmacs"] < dense["gmacs"] and len(ats["tokens_per_ats_block"]) == 3
    assert "ATS blocks 1,2,3" in stdout


@pytest.mark.parametrize("args,match", [
    (["eval", "--model", "hf:/no/such/folder"], "--model hf:/no/such/folder: cannot load it"),
    (["finetune", "--model", "hf:x", "--epochs", "1"], "`ats-vit finetune` takes timm models"),
    (["eval", "--model", "hf:x", "--checkpoint", "w.safetensors"], "--checkpoint applies to timm models"),
])
def test_bad_transformers_arguments_give_one_error_line(args, match, tmp_path, capsys):
    code, _, err = run(args + ["--out", str(tmp_path / "o")], capsys)
    assert code != 0 and one_error_line(err) and match in err


def test_unsupported_transformers_folder_is_refused(tmp_path, capsys):
    tiny_swin().save_pretrained(tmp_path / "swin")
    code, _, err = run(["eval", "--model", f"hf:{tmp_path / 'swin'}", "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and one_error_line(err) and "SwinForImageClassification is not supported" in err


def timm_twin(model):
    """The timm ViT/DeiT that computes what the transformers one does, with its weights copied."""
    from functools import partial

    import timm
    from torch import nn
    deit = hasattr(model, "deit")
    backbone = model.deit if deit else model.vit
    config = model.config
    twin = timm.create_model("deit_tiny_distilled_patch16_224" if deit else "vit_tiny_patch16_224",
                             img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.hidden_size,
                             depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                             mlp_ratio=config.intermediate_size / config.hidden_size, num_classes=config.num_labels,
                             norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps)).eval()
    emb = backbone.embeddings
    with torch.no_grad():
        twin.patch_embed.proj.load_state_dict(emb.patch_embeddings.projection.state_dict())
        twin.cls_token.copy_(emb.cls_token)
        twin.pos_embed.copy_(emb.position_embeddings)
        if deit:
            twin.dist_token.copy_(emb.distillation_token)
        for blk, layer in zip(twin.blocks, backbone.layers):
            a = layer.attention
            blk.norm1.load_state_dict(layer.layernorm_before.state_dict())
            blk.norm2.load_state_dict(layer.layernorm_after.state_dict())
            blk.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            blk.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            blk.attn.proj.load_state_dict(a.o_proj.state_dict())
            blk.mlp.fc1.load_state_dict(layer.mlp.fc1.state_dict())
            blk.mlp.fc2.load_state_dict(layer.mlp.fc2.state_dict())
        twin.norm.load_state_dict(backbone.layernorm.state_dict())
        if deit:
            twin.head.load_state_dict(model.cls_classifier.state_dict())
            twin.head_dist.load_state_dict(model.distillation_classifier.state_dict())
        else:
            twin.head.load_state_dict(model.classifier.state_dict())
    return twin


@pytest.mark.parametrize("kind", ["vit", "deit_teacher"])
@pytest.mark.parametrize("reducer,options", [("ats", dict(num_tokens=20)), ("ats", dict(num_tokens=0.5, sampler="topk")),
                                             ("evit", dict(num_tokens=0.6)), ("tome", dict(num_tokens=0.6))])
def test_every_reducer_computes_what_it_computes_in_the_timm_twin(kind, reducer, options):
    model = make_hf(kind)
    twin = timm_twin(model)
    x = images(kind, 4)
    with torch.no_grad():
        assert torch.allclose(twin(x), logits(model, x), atol=1e-5, rtol=0)  # the twin is faithful
        for m in (model, twin):
            ats_vit.apply(m, blocks=[1, 2, 3], reducer=reducer, **options)
        ours, theirs = logits(model, x), twin(x)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    a, b = ats_vit.last_stats(model), ats_vit.last_stats(twin)
    assert torch.equal(a.tokens, b.tokens) and all(torch.equal(p, q) for p, q in zip(a.positions, b.positions))
    assert torch.allclose(a.gmacs, b.gmacs, rtol=1e-12) and a.dense_gmacs == b.dense_gmacs


def test_ablate_on_cvt_runs_the_variants_it_supports(hf_folder, image_folder, tmp_path, capsys):
    code, stdout, err = run(["ablate", "--model", f"hf:{hf_folder}", "--data", str(image_folder),
                             "--reductions", "0.1", "--calib-images", "9", "--workers", "0", "--timing-repeats", "1",
                             "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = [r["method"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]]
    assert rows == ["dense", "ATS 1-3 released (K=all)", "ATS 1-3 -10%", "top-K 1-3 -10%", "random selection 1-3 -10%", "ATS block 1 -10%"]
    for skipped in ("EViT 1-3", "ToMe 1-3", "ATS 1-3, no value norm"):
        assert f"skipping {skipped}: CvT supports reducer 'ats'" in stdout


@pytest.mark.parametrize("kind", ["vit", "cvt"])
def test_bare_backbones_are_patched_too(kind):
    model = make_hf(kind)
    backbone = model.vit if kind == "vit" else model.cvt
    x = images(kind, 2)
    with torch.no_grad():
        expected = backbone(pixel_values=x)
        ats_vit.apply(backbone, blocks=[])
        out = backbone(pixel_values=x)
        assert torch.allclose(out.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=0)
        ats_vit.remove(backbone)
        ats_vit.apply(backbone, blocks=[1, 2], num_tokens=6)
        backbone(pixel_values=x)
    stats = ats_vit.last_stats(backbone)
    assert (stats.num_kept <= 6).all() and (stats.gmacs < stats.dense_gmacs).all()


def test_views_follow_dtype_moves_and_loaded_weights():
    model = ats_vit.apply(make_hf("vit"), blocks=[])
    other = make_hf("vit", seed=1)
    model.load_state_dict(other.state_dict())  # the views hold the layers' own parameters
    model.to(torch.float64)
    x = images("vit", 2, dtype=torch.float64)
    assert torch.allclose(logits(model, x), logits(other.to(torch.float64), x), atol=1e-12, rtol=0)


def test_a_timm_vit_converted_to_transformers_computes_the_same(tmp_path):
    """timm weights in a ViTForImageClassification (the real ViT-Ti's path to ``hf:``): the same
    logits, dense and with ATS, the same picks per image, and the saved folder loads by itself."""
    from reference import make_vit
    from ats_vit.hosts.hf import save_vit_from_timm, vit_from_timm
    base = make_vit("vit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=7).double()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    converted = vit_from_timm(base).double()
    assert torch.allclose(logits(converted, x), base(x), atol=1e-10, rtol=0)
    timm_ats, hf_ats = ats_vit.apply(base, num_tokens=30), ats_vit.apply(converted, num_tokens=30)
    with torch.no_grad():
        want = timm_ats(x)
    got = logits(hf_ats, x)
    a, b = ats_vit.last_stats(timm_ats), ats_vit.last_stats(hf_ats)
    assert len(set(a.num_kept[:, -1].tolist())) > 1 and torch.equal(a.num_kept, b.num_kept)
    assert all(a.kept_positions(i, blk) == b.kept_positions(i, blk) for i in range(4) for blk in a.blocks)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    ats_vit.remove(timm_ats)
    save_vit_from_timm(timm_ats.float(), tmp_path / "vit")
    reloaded = load(tmp_path / "vit")
    assert torch.allclose(logits(reloaded, x.float()), timm_ats(x.float()), atol=1e-5, rtol=0)
    from transformers import AutoImageProcessor
    processor = AutoImageProcessor.from_pretrained(tmp_path / "vit")
    assert processor.crop_pct == 0.9 and processor.size["shortest_edge"] == 64


@pytest.mark.parametrize("kwargs, match", [(dict(init_values=1e-5), "LayerScale"), (dict(global_pool="avg"), "avg"),
                                           (dict(reg_tokens=2), "registers")])
def test_converting_what_transformers_vit_cannot_hold_is_refused(kwargs, match):
    import timm
    from ats_vit.hosts.hf import vit_from_timm
    with pytest.raises(TypeError, match=match):
        vit_from_timm(timm.create_model("vit_tiny_patch16_224", img_size=32, **kwargs))
