import math

import pytest
import torch

from ats_vit import inverse_transform_sampling, token_scores, topk_sampling
from reference import slow_its, slow_scores, slow_topk


def random_scores(rows: int, n: int, zero_fraction: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(rows, n, generator=g) ** 3  # skewed, like attention
    s[torch.rand(rows, n, generator=g) < zero_fraction] = 0.0
    return s


def as_lists(index: torch.Tensor) -> list[list[int]]:
    return [[int(i) for i in row if i >= 0] for row in index]


@pytest.mark.parametrize("zero_fraction", [0.0, 0.3])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 19, 20, 21, 64])
@pytest.mark.parametrize("sampler,slow", [(inverse_transform_sampling, slow_its), (topk_sampling, slow_topk)])
def test_sampler_matches_slow_rule(sampler, slow, k, zero_fraction):
    scores = random_scores(8, 20, zero_fraction, seed=k)
    scores[0, :] = 0.0  # nothing eligible
    scores[1, :] = 0.0
    scores[1, 5] = 0.3  # one eligible token
    index = sampler(scores, k)
    assert index.dtype == torch.long
    assert as_lists(index) == [slow(row.tolist(), k) for row in scores]
    assert index.shape[1] == max(len(r) for r in as_lists(index))


@pytest.mark.parametrize("k", [3, 20, 64, torch.tensor([1, 4, 9, 30, 50, 2])])
@pytest.mark.parametrize("sampler,slow", [(inverse_transform_sampling, slow_its), (topk_sampling, slow_topk)])
def test_off_the_cpu_samplers_keep_the_full_width_without_reading_the_device(sampler, slow, k, monkeypatch):
    """Where a host read waits for the device, the built-in samplers answer (B, n), padded with
    -1, with the same picks as the slow rule (the CPU's exemptions switched off: the PyTorch
    path and no native op)."""
    import ats_vit.core.sampling as sampling
    from ats_vit.core import native

    scores = random_scores(6, 30, 0.2, seed=2)
    monkeypatch.setattr(sampling, "HOST_DEVICES", ())
    monkeypatch.setattr(native, "available", lambda: False)
    index = sampler(scores, k)
    ks = k.tolist() if isinstance(k, torch.Tensor) else [k] * 6
    assert index.shape == (6, 30) and as_lists(index) == [slow(r.tolist(), kk) for r, kk in zip(scores, ks)]


@pytest.mark.parametrize("sampler,slow", [(inverse_transform_sampling, slow_its), (topk_sampling, slow_topk)])
def test_per_row_num_samples(sampler, slow):
    scores = random_scores(5, 30, 0.2, seed=1)
    k = torch.tensor([1, 4, 9, 30, 50])
    assert as_lists(sampler(scores, k)) == [slow(r.tolist(), int(kk)) for r, kk in zip(scores, k)]


def test_output_layout_ascending_and_right_padded():
    index = inverse_transform_sampling(random_scores(16, 50, 0.4, seed=3), 25)
    for row in index.tolist():
        real = [i for i in row if i >= 0]
        assert row[:len(real)] == real and all(i == -1 for i in row[len(real):])
        assert real == sorted(set(real))
    assert (index >= 0).any(dim=0).all(), "K'max column must be used by some row"


def test_its_keeps_fewer_distinct_tokens_than_grid_points_and_never_the_lowest():
    scores = random_scores(32, 100, 0.0, seed=4)
    index = inverse_transform_sampling(scores, 100)
    kept = (index >= 0).sum(dim=1)
    assert (kept < 100).all() and (kept >= 1).all()
    lowest = scores.argmin(dim=1)
    assert not (index == lowest[:, None]).any()
    # high-score tokens attract grid points: the top token is always kept
    assert (index == scores.argmax(dim=1)[:, None]).any(dim=1).all()


@pytest.mark.parametrize("sampler", [inverse_transform_sampling, topk_sampling])
def test_padding_does_not_change_a_rows_choice(sampler):
    scores = random_scores(6, 40, 0.0, seed=5)
    alone = as_lists(sampler(scores, 17))
    # zeros anywhere: appended padding and interleaved ineligible tokens
    padded = torch.cat([scores, torch.zeros(6, 13)], dim=1)
    assert as_lists(sampler(padded, 17)) == alone
    interleaved = torch.zeros(6, 80)
    interleaved[:, ::2] = scores
    assert as_lists(sampler(interleaved, 17)) == [[2 * i for i in r] for r in alone]


def test_scale_of_scores_does_not_matter():
    scores = random_scores(4, 30, 0.1, seed=6)
    assert torch.equal(inverse_transform_sampling(scores, 12), inverse_transform_sampling(scores * 7.5, 12))


@pytest.mark.parametrize("sampler", [inverse_transform_sampling, topk_sampling])
def test_non_finite_scores_are_never_kept_or_out_of_range(sampler):
    scores = random_scores(4, 12, 0.0, seed=7)
    scores[0, 3] = float("nan")
    scores[1, :] = float("nan")
    scores[2, 0] = float("inf")
    scores[3, 5] = float("-inf")
    index = sampler(scores, 12)
    assert ((index >= -1) & (index < 12)).all()
    assert 3 not in index[0].tolist() and (index[1] == -1).all()
    assert 0 not in index[2].tolist() and 5 not in index[3].tolist()
    assert as_lists(index) == [({inverse_transform_sampling: slow_its, topk_sampling: slow_topk}[sampler])(
        r.tolist(), 12) for r in scores]


@pytest.mark.parametrize("sampler", [inverse_transform_sampling, topk_sampling])
@pytest.mark.parametrize("bad", [0, -3, 1.5, True, torch.tensor([2, 0]), torch.tensor([1.0, 2.0]), torch.tensor([3])])
def test_bad_num_samples(sampler, bad):
    with pytest.raises(ValueError, match="^k "):
        sampler(torch.rand(2, 5), bad)


def test_bad_scores_shape():
    with pytest.raises(ValueError, match="scores"):
        inverse_transform_sampling(torch.rand(5), 2)


@pytest.mark.parametrize("prefix", [1, 2, 5])
def test_token_scores_match_slow_version(prefix):
    g = torch.Generator().manual_seed(prefix)
    B, H, N, d = 3, 4, 11, 8
    attn = torch.randn(B, H, N, N, generator=g, dtype=torch.float64).softmax(-1)
    v = torch.randn(B, H, N, d, generator=g, dtype=torch.float64)
    scores = token_scores(attn, v, prefix)
    assert scores.dtype == torch.float64 and scores.shape == (B, N - prefix)
    for b in range(B):
        assert scores[b].tolist() == pytest.approx(slow_scores(attn[b], v[b], prefix), rel=1e-12)
    assert torch.allclose(scores.sum(-1), torch.ones(B, dtype=torch.float64))


def test_token_scores_padding_scores_zero_and_rest_renormalised():
    g = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 9, 9, generator=g).softmax(-1)
    v = torch.randn(2, 3, 9, 4, generator=g)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    full = token_scores(attn, v, 1, mask)
    patch = token_scores(attn, v, 1, mask[:, 1:])
    assert torch.equal(full, patch)
    assert (full[1, 5:] == 0).all() and (full[0] > 0).all()
    assert torch.allclose(full.sum(-1), torch.ones(2))
    unmasked = token_scores(attn, v, 1)
    assert torch.allclose(full[1, :5], unmasked[1, :5] / unmasked[1, :5].sum())


def test_token_scores_float32_under_low_precision_inputs():
    attn = torch.rand(1, 2, 5, 5).softmax(-1).bfloat16()
    v = torch.rand(1, 2, 5, 3).bfloat16()
    out = token_scores(attn, v)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("autocast", [True, False])
def test_class_attention_is_float64_from_bfloat16_queries_and_keys(autocast):
    """The selection's inputs: the class row's attention from bfloat16 q and k, computed in
    float64 even under autocast, equals the slow float64 computation from the same values."""
    from ats_vit.core.scoring import class_attention_value_norm

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g).mul(3).bfloat16() for _ in range(3))
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, 40:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        scores = class_attention_value_norm(q, k, v, 1, valid, 0.25)
    attn = ((q.double() * 0.25) @ k.double().transpose(-2, -1)).masked_fill(~valid[:, None, None], float("-inf"))
    reference = torch.tensor([slow_scores(a, b, 1) for a, b in zip(attn.softmax(-1), v.double())], dtype=torch.float64)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, reference, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kwargs,match", [
    (dict(attn=torch.rand(2, 5, 5), v=torch.rand(2, 1, 5, 3)), "4-D"),
    (dict(attn=torch.rand(2, 1, 5, 5), v=torch.rand(2, 1, 4, 3)), "v must be"),
    (dict(attn=torch.rand(2, 1, 5, 5), v=torch.rand(2, 1, 5, 3), num_prefix_tokens=0), "num_prefix_tokens"),
    (dict(attn=torch.rand(2, 1, 5, 5), v=torch.rand(2, 1, 5, 3), token_mask=torch.ones(2, 3, dtype=torch.bool)),
     "token_mask"),
])
def test_token_scores_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_scores(**kwargs)
