"""DynamicViT (the trained rival): its predictor, training masks, attention masking and losses,
and its inference pruning, against slow references on tiny shapes; its GMACs against the flop
counter."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ats_vit
from ats_vit.core.block import keep_masked_attention
from ats_vit.reducers.dynamicvit import KeepPredictor, dynamicvit_loss, keep_targets
from reference import make_vit

BLOCKS = [3, 6, 9]


@pytest.fixture(scope="module")
def vit():
    """DeiT-Ti shape at 64 px (16 patches), float64, with trained-looking (non-zero) predictors."""
    model = make_vit("deit_tiny_patch16_224", img_size=64).double()
    ats_vit.apply(model, blocks=BLOCKS, num_tokens=0.7, reducer="dynamicvit")
    ats_vit.remove(model)  # the predictors stay: they are the model's parameters
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.token_predictors.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def slow_predictor(pred: KeepPredictor, x: torch.Tensor, keep: list) -> torch.Tensor:
    """Log-probabilities (n, 2) of one image's patch tokens x (n, C), token by token."""
    norm, lin, _ = pred.embed
    h = [F.gelu(lin(F.layer_norm(t, t.shape, norm.weight, norm.bias, norm.eps))) for t in x]
    half = x.shape[1] // 2
    kept = [h[j][half:] for j in range(len(h)) if keep[j]]
    world = sum(kept) / len(kept)
    out = []
    for t in h:
        z = torch.cat([t[:half], world])
        for layer in pred.score:
            z = layer(z)
        out.append(z - torch.logsumexp(z, 0))
    return torch.stack(out)


def test_predictor_matches_the_token_by_token_reference(vit):
    pred = vit.token_predictors["3"]
    x = torch.randn(2, 16, 192, dtype=torch.float64)
    keep = torch.tensor([[1.0] * 10 + [0.0] * 6, [0.0, 1.0] * 8], dtype=torch.float64)
    out = pred(x, keep)
    for b in range(2):
        assert torch.allclose(out[b], slow_predictor(pred, x[b], keep[b].tolist()), atol=1e-12)
    moved = x.clone()
    moved[0, 12] += 5.0  # a dropped token: its own scores change, no one else's
    changed = (pred(moved, keep)[0] - out[0]).abs().sum(-1) > 0
    assert changed.tolist() == [j == 12 for j in range(16)]


def test_keep_masked_attention_sees_the_kept_keys_and_itself():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1]], dtype=torch.float64)
    out = keep_masked_attention(q, k, v, keep, 0.5)
    for b in range(2):
        for h in range(3):
            for i in range(6):
                seen = [j for j in range(6) if keep[b, j] or j == i]
                w = torch.softmax(torch.stack([0.5 * q[b, h, i] @ k[b, h, j] for j in seen]), 0)
                want = sum(wj * v[b, h, j] for wj, j in zip(w, seen))
                assert torch.allclose(out[b, h, i], want, atol=1e-12)


def test_keep_masked_attention_gradients_equal_the_written_out_softmax_chain():
    """The hand-written backward against autograd through the plain formula, in float64: the
    queries', keys', values' and (straight-through Gumbel's route to the predictors) the
    mask's gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[1, 1, 0, 1, 0, 0, 1], [1, 0, 0, 0, 0, 1, 0]], dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, 7, 4, dtype=torch.float64)

    def plain(q, k, v, keep):
        e = (0.5 * q @ k.transpose(-2, -1)).exp()
        eye = torch.eye(7, dtype=torch.float64)
        w = e * (keep[:, None, None, :] * (1 - eye) + eye)
        return (w / w.sum(dim=-1, keepdim=True)) @ v

    got = torch.autograd.grad((keep_masked_attention(q, k, v, keep, 0.5) * weights).sum(), (q, k, v, keep))
    want = torch.autograd.grad((plain(q, k, v, keep) * weights).sum(), (q, k, v, keep))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-12)
    assert got[3].abs().min() > 1e-6  # every key's mask entry, dropped ones too, gets a gradient
    assert torch.autograd.gradcheck(lambda q, keep: keep_masked_attention(q, k, v, keep, 0.5), (q, keep))


def slow_pruned_forward(model, image: torch.Tensor, keep_per_block) -> torch.Tensor:
    """Logits of one image (1, C, H, W) through timm's own blocks, the patch tokens that
    ``keep_per_block(block, tokens)`` returns (indices into the current patch tokens) kept before
    each pruning block."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(image)))
    for i, blk in enumerate(model.blocks):
        if i in BLOCKS:
            keep = keep_per_block(i, x)
            x = torch.cat([x[:, :1], x[:, 1:][:, keep]], dim=1)
        x = blk(x)
    return model.forward_head(model.norm(x))[0]


def test_inference_keeps_the_top_k_by_keep_probability_and_runs_the_rest_on_them(vit):
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    model = ats_vit.apply(copy.deepcopy(vit), blocks=BLOCKS, num_tokens=0.7, reducer="dynamicvit")
    with torch.no_grad():
        logits = model(x)
    stats = ats_vit.last_stats(model)
    assert stats.num_kept.tolist() == [[11, 8, 6]] * 3  # round(0.7 * 16), then of 11, then of 8

    def top_k(i, tokens):
        pred = vit.token_predictors[str(i)]
        scores = slow_predictor(pred, tokens[0, 1:], [1] * (tokens.shape[1] - 1))[:, 0]
        k = round(0.7 * (tokens.shape[1] - 1))
        return sorted(sorted(range(len(scores)), key=lambda j: -float(scores[j]))[:k])

    for b in range(3):
        with torch.no_grad():
            want = slow_pruned_forward(vit, x[b:b + 1], top_k)
        assert torch.allclose(logits[b], want, atol=1e-10)
    assert len({tuple(p[0].tolist()) for p in stats.positions}) == 3  # the positions shrink block by block


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_training_masks_equal_pruning_those_tokens_and_train_the_predictors(vit, pool, monkeypatch):
    """In training nothing is removed; with the Gumbel decisions fixed, the class token's logits
    are those of physically pruning the dropped tokens (a token that sees only kept keys and
    itself computes as if the dropped ones were gone; average pooling weighs the kept ones only),
    the masks only shrink, and the gradient reaches every predictor through the straight-through
    decisions."""
    g = torch.Generator().manual_seed(7)
    decisions = {}

    def fixed_gumbel(log_probs, hard):
        B, n, _ = log_probs.shape
        keep = (torch.rand(B, n, generator=g) < 0.7).to(log_probs.dtype)
        decisions[len(decisions)] = keep
        onehot = torch.stack([keep, 1 - keep], dim=-1)
        return onehot + log_probs - log_probs.detach()  # straight-through, as gumbel_softmax(hard=True)

    monkeypatch.setattr(F, "gumbel_softmax", fixed_gumbel)
    base = copy.deepcopy(vit)
    base.global_pool = pool
    model = ats_vit.apply(copy.deepcopy(base), blocks=BLOCKS, num_tokens=0.7, reducer="dynamicvit").train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    logits = model(x)
    masks = ats_vit.hosts._patch(model).last.keep_masks
    assert len(masks) == 3 and all((m[:, 0] == 1).all() for m in masks)
    assert all((later <= earlier).all() for earlier, later in zip(masks, masks[1:]))
    for b in range(2):
        kept = list(range(16))

        def replay(i, tokens, b=b):
            nonlocal kept
            stage = BLOCKS.index(i)
            alive = [j for j in kept if masks[stage][b, 1 + j] == 1]
            keep = [kept.index(j) for j in alive]
            kept = alive
            return keep

        with torch.no_grad():
            want = slow_pruned_forward(base, x[b:b + 1], replay)
        assert torch.allclose(logits[b], want, atol=1e-10)
    logits.sum().backward()
    for i in BLOCKS:
        assert model.token_predictors[str(i)].score[-1].weight.grad.abs().sum() > 0


def test_loss_terms_against_a_slow_computation():
    torch.manual_seed(1)
    B, N, C, P = 3, 7, 5, 1
    logits, teacher_logits = torch.randn(B, 4, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1])
    features, teacher_features = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, N, C, dtype=torch.float64)
    first = torch.cat([torch.ones(B, 1), (torch.rand(B, N - 1) < 0.8).double()], 1).double()
    second = first * torch.cat([torch.ones(B, 1), (torch.rand(B, N - 1) < 0.7).double()], 1)
    total, terms = dynamicvit_loss(logits, labels, teacher_logits, features, teacher_features, [first, second],
                                   [0.8, 0.5], P)
    ce = sum(-torch.log_softmax(logits[b], 0)[labels[b]] for b in range(B)) / B
    ratio = sum((float(mask[b, 1:].sum()) / (N - 1) - target) ** 2
                for mask, target in ((first, 0.8), (second, 0.5)) for b in range(B)) / (2 * B)
    kl = sum(sum(math.exp(s) * (s - t) for s, t in zip(torch.log_softmax(logits[b], 0).tolist(),
                                                          torch.log_softmax(teacher_logits[b], 0).tolist()))
             for b in range(B)) / B
    squares = [float(((features[b, j] - teacher_features[b, j]) ** 2).sum())
               for b in range(B) for j in range(1, N) if second[b, j] == 1]
    distill = sum(squares) / (len(squares) * C)
    want = [float(ce), float(ratio), kl, distill]
    assert [float(terms[k]) for k in ("ce", "ratio", "kl", "distill")] == pytest.approx(want, rel=1e-10)
    assert float(total) == pytest.approx(want[0] + 2 * want[1] + 0.5 * want[2] + 0.5 * want[3], rel=1e-10)


def test_keep_ratio_term_holds_each_image_to_the_target():
    """One image keeping every patch and one keeping none meet a 0.5 target on average, but
    inference keeps half in each: the term is (1 - 0.5)^2 per image, not 0 for the batch."""
    B, N, C, P = 2, 5, 3, 1
    logits, labels = torch.zeros(B, 4, dtype=torch.float64), torch.zeros(B, dtype=torch.long)
    features = torch.zeros(B, N, C, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    _, terms = dynamicvit_loss(logits, labels, logits, features, features, [mask], [0.5], P)
    assert float(terms["ratio"]) == pytest.approx(0.25, rel=1e-12)


def test_targets_follow_the_counts_inference_keeps():
    assert keep_targets([0.7, 0.7, 0.7], 196) == [137 / 196, 96 / 196, 67 / 196]
    assert keep_targets([100, None, 0.5], 196) == [100 / 196, 100 / 196, 50 / 196]


@pytest.mark.parametrize("rho", [0.5, 0.7, 0.9])
def test_gmacs_equal_the_flop_counter_predictors_included(vit, rho):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = ats_vit.apply(copy.deepcopy(vit).float(), blocks=BLOCKS, num_tokens=rho, reducer="dynamicvit")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    gmacs = ats_vit.last_stats(model).gmacs
    assert torch.allclose(gmacs, gmacs[:1].expand_as(gmacs))  # a fixed count per image
    assert float(gmacs.sum()) * 1e9 == pytest.approx(counter.get_total_flops() / 2, rel=1e-9)


def test_predictors_belong_to_the_model(vit):
    model = copy.deepcopy(vit)
    trained = copy.deepcopy(model.token_predictors.state_dict())
    ats_vit.apply(model, blocks=BLOCKS, num_tokens=0.5, reducer="dynamicvit")
    ats_vit.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(trained.values(), model.token_predictors.state_dict().values()))
    assert any(k.startswith("token_predictors.3.") for k in model.state_dict())
    with pytest.raises(ValueError, match="predictors are for blocks \\[3, 6, 9\\], not \\[4, 8\\]"):
        ats_vit.apply(model, blocks=[4, 8], reducer="dynamicvit")
    assert not ats_vit.is_patched(model)


def test_learning_rate_groups_scale_the_backbone_and_keep_timms_weight_decay_split(vit):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from ats_vit.jobs.training import scaled_param_groups

    model = copy.deepcopy(vit).float()
    scale = lambda name: 1.0 if name.startswith("token_predictors.") else 0.01  # noqa: E731
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                                    param_group_fn=lambda m: scaled_param_groups(m, 0.05, scale))
    CosineLRScheduler(optimizer, t_initial=10, t_in_epochs=False).step_update(0)
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[id(p)] = (group["lr"], group["weight_decay"])
    names = dict(model.named_parameters())
    assert len(seen) == len(names)
    for name, p in names.items():
        lr, decay = seen[id(p)]
        assert lr == pytest.approx(1e-3 * scale(name))
        assert decay == (0.0 if p.ndim <= 1 or name in ("pos_embed", "cls_token") else 0.05), name


@pytest.mark.slow  # over 10 s on the 2-core CPU
def test_finetune_trains_dynamicvit_and_its_checkpoint_loads_with_the_predictors(tmp_path, capsys):
    """`finetune --reducer dynamicvit`: two AdamW steps move the predictors at --lr and the
    backbone at 0.01 x --lr; the saved file holds both and loads back key for key."""
    from safetensors.torch import load_file

    from ats_vit.jobs.loading import load_model
    from ats_vit.zoo import FMNIST_WEIGHTS
    from conftest import run

    code, _, err = run(["finetune", "--reducer", "dynamicvit", "--num-tokens", "0.7", "--limit", "64", "--epochs",
                        "1", "--batch-size", "32", "--lr", "1e-3", "--warmup-epochs", "0", "--workers", "0",
                        "--out", str(tmp_path)], capsys)
    assert code == 0, err
    saved, base = load_file(str(tmp_path / "last.safetensors")), load_file(str(FMNIST_WEIGHTS))
    assert sorted({k.split(".")[1] for k in saved if k.startswith("token_predictors.")}) == ["3", "6", "9"]
    moved = max(float((saved[k] - base[k]).abs().max()) for k in base)
    assert 0 < moved <= 2 * 1e-5 * 1.1  # Adam moves each weight by at most about lr per step
    loaded = load_model(str(tmp_path / "last.safetensors"))
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    model = ats_vit.apply(loaded, reducer="dynamicvit", num_tokens=0.7)  # the trained predictors, blocks 3, 6, 9
    with torch.no_grad():
        model(torch.randn(2, 1, 28, 28))
    assert ats_vit.last_stats(model).num_kept[0].tolist() == [137, 96, 67]
