"""Scoring rules, the random sampler, and the rival reducers EViT and ToMe, each against a slow
per-image reference, with batch independence, prefix tokens and MACs checked."""
import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import ats_vit
from ats_vit.core.scoring import all_queries_attention, class_attention, class_attention_value_norm
from reference import make_vit, reference_rival_forward


def images(n, size=64, seed=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def vit64():
    return make_vit("deit_small_patch16_224", img_size=64).double()


def _slow_scores(q, k, v, P, valid, rule):
    """One image at a time, sums written out over heads and query rows."""
    B, H, N, d = q.shape
    out = torch.zeros(B, N - P, dtype=torch.float64)
    for b in range(B):
        real = [j for j in range(N) if valid is None or valid[b, j]]
        probs = torch.zeros(H, N, N, dtype=torch.float64)
        for h in range(H):
            logits = (q[b, h] @ k[b, h, real].T) * 0.125
            probs[h][:, real] = torch.softmax(logits, dim=-1)
        for j in real[P:]:
            if rule == "cls":
                s = float(probs[:, 0, j].sum())
            elif rule == "cls_value":
                s = float(probs[:, 0, j].sum()) * float(v[b, :, j].flatten().norm())
            else:
                s = float(sum(probs[h, i, j] for h in range(H) for i in real))
            out[b, j - P] = s
        out[b] /= out[b].sum()
    return out


@pytest.mark.parametrize("rule,fn", [("cls_value", class_attention_value_norm), ("cls", class_attention),
                                     ("all_queries", all_queries_attention)])
def test_scoring_rules_match_slow_sums(rule, fn):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 6:] = False
    got = fn(q, k, v, 1, valid, 0.125)
    assert torch.allclose(got, _slow_scores(q, k, v, 1, valid, rule), atol=1e-12)
    assert (got[1, 5:] == 0).all()


def test_random_sampler_keeps_k_distinct_eligible_tokens_and_follows_the_seed():
    scores = torch.tensor([[0.1, 0.0, 0.3, 0.2, 0.4, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    torch.manual_seed(0)
    first = ats_vit.random_sampling(scores, 3)
    assert first[0].tolist() == sorted(set(first[0].tolist())) and len(first[0]) == 3
    assert set(first[0].tolist()) <= {0, 2, 3, 4} and first[1].tolist() == [0, 1, -1]
    torch.manual_seed(0)
    assert torch.equal(ats_vit.random_sampling(scores, 3), first)
    draws = set()
    for seed in range(20):
        torch.manual_seed(seed)
        draws.add(tuple(ats_vit.random_sampling(scores, 2)[0].tolist()))
    assert len(draws) > 1


@pytest.mark.parametrize("kind", ["evit", "tome"])
def test_rival_reducers_match_slow_reference_per_image(vit64, kind):
    blocks = (3, 6, 9)
    model = ats_vit.apply(copy.deepcopy(vit64), blocks=blocks, num_tokens=0.7, reducer=kind)
    x = images(3)
    with torch.no_grad():
        logits = model(x)
        stats = ats_vit.last_stats(model)
        for b in range(3):
            expected, record = reference_rival_forward(vit64, x[b:b + 1], blocks, 0.7, kind)
            assert torch.allclose(logits[b], expected, atol=1e-9), kind
            for j, block in enumerate(blocks):
                assert stats.positions[j][b].tolist() == record[block]


def test_tome_average_pooling_weighs_merged_tokens_by_their_size():
    """With global_pool="avg" a merged token stands for several patches in the average (ToMe's
    proportional pooling): against the slow per-image reference, which weighs by its own sizes."""
    base = make_vit("deit_small_patch16_224", img_size=64, global_pool="avg").double()
    model = ats_vit.apply(copy.deepcopy(base), blocks=(3, 6, 9), num_tokens=0.7, reducer="tome")
    x = images(2).double()
    with torch.no_grad():
        logits = model(x)
        for b in range(2):
            expected, _ = reference_rival_forward(base, x[b:b + 1], (3, 6, 9), 0.7, "tome")
            assert (logits[b] - expected).abs().max() <= 1e-9


@pytest.mark.parametrize("kwargs", [dict(reducer="evit", num_tokens=0.6), dict(reducer="tome", num_tokens=0.7),
                                    dict(scorer="cls", num_tokens=0.6), dict(scorer="all_queries", num_tokens=0.6),
                                    dict(sampler="random", num_tokens=0.6)])
def test_every_reducer_keeps_prefix_tokens_batch_independence_and_counts_macs(kwargs):
    base = make_vit("deit_small_distilled_patch16_224", img_size=64)  # two prefix tokens
    model = ats_vit.apply(copy.deepcopy(base), **kwargs)
    x = images(4).float()
    with torch.no_grad():
        torch.manual_seed(0)
        batch = model(x)
        stats = ats_vit.last_stats(model)
        assert (stats.num_kept[:, -1] < 16).all()
        for b in range(4):
            torch.manual_seed(0)
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                alone = model(x[b:b + 1])
            if kwargs.get("sampler") != "random":  # a random draw differs with the batch
                assert (alone[0] - batch[b]).abs().max() <= 1e-4
                assert torch.equal(ats_vit.last_stats(model).num_kept[0], stats.num_kept[b])
            assert ats_vit.last_stats(model).gmacs[0].item() * 1e9 == pytest.approx(counter.get_total_flops() // 2)
    assert stats.tokens[:, 0].tolist() == [18] * 4  # 16 patches + class + distillation token


def test_rival_reducers_refuse_sampler_and_scorer_and_bad_names(vit64):
    for kwargs, match in [(dict(reducer="evit", sampler="topk"), "reducer='ats' only"),
                          (dict(reducer="merge"), "reducer must be one of"),
                          (dict(scorer="entropy"), "scorer must be one of")]:
        model = copy.deepcopy(vit64)
        with pytest.raises(ValueError, match=match):
            ats_vit.apply(model, **kwargs)
        assert not ats_vit.is_patched(model)
