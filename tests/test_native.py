"""The native selection ops against their pure-PyTorch twins: the same bits on random and
adversarial input, and the fallback where the native build is impossible."""
import os
import subprocess
import sys

import pytest
import torch

from ats_vit.core import native
from ats_vit.core.block import select, varlen_attention_reference
from ats_vit.core.sampling import inverse_transform_reference, inverse_transform_sampling, k_per_row
from ats_vit.core.scoring import class_attention_value_norm, class_attention_value_norm_reference
from ats_vit.core.tokens import Layout, Tokens

def test_the_native_ops_are_built():
    """The Makefile installs a compiler, so the native path is the one tested and used here."""
    assert native.available()


def _adversarial_scores():
    """(scores, k) cases: ties, zeros, negatives, inf and NaN, one eligible token, K = 1, K > n,
    near-ties at float64 resolution, an empty batch and rows of one token."""
    g = torch.Generator().manual_seed(0)
    tie = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 3.0]], dtype=torch.float64)
    near = torch.full((2, 9), 1.0, dtype=torch.float64)
    near[0, ::2] += 1e-15
    near[1] += torch.arange(9, dtype=torch.float64) * 2.0 ** -52
    odd = torch.tensor([[0.0, -1.0, float("inf"), float("nan"), 2.0], [0.0, 0.0, 0.0, 0.0, 0.0],
                        [-0.0, 1e-300, 1e300, 1.0, 5e-324]], dtype=torch.float64)
    cases = [(tie, k) for k in (1, 2, 3, 4, 7)] + [(near, k) for k in (1, 4, 9, 20)] + [(odd, k) for k in (1, 2, 5, 9)]
    cases += [(torch.zeros(0, 5), 3), (torch.rand(3, 1, generator=g), 2), (torch.rand(4, 0, generator=g), 1)]
    for rows, n in [(1, 196), (64, 196), (7, 50), (5, 3)]:
        s = torch.rand(rows, n, generator=g) ** 3
        s[torch.rand(rows, n, generator=g) < 0.2] = 0
        cases += [(s, k) for k in (1, 2, n // 2 + 1, n, 2 * n + 3)]
        cases.append((s, torch.randint(1, 2 * n + 2, (rows,), generator=g)))
        cases.append((s.to(torch.bfloat16), n))
        cases.append(((s * 1e-30).double(), n))
    return cases


@pytest.mark.parametrize("case", range(len(_adversarial_scores())))
def test_native_sampling_picks_what_the_pytorch_twin_picks(case):
    scores, k = _adversarial_scores()[case]
    native_index = inverse_transform_sampling(scores, k)
    twin = inverse_transform_reference(scores, k_per_row(k, scores.shape[0], scores.device))
    assert native_index.dtype == twin.dtype == torch.long
    assert torch.equal(native_index, twin)


def _qkv(B, H, N, d, dtype, g, mask: bool):
    """q, k, v (B, H, N, d) as views of one projection (non-contiguous, as in a block) and a
    validity mask with per-image lengths."""
    qkv = (torch.randn(B, N, 3, H, d, generator=g) * 3).to(dtype).permute(2, 0, 3, 1, 4)
    valid = None
    if mask:
        lengths = torch.randint(3, N + 1, (B,), generator=g)
        lengths[0] = N
        valid = torch.arange(N)[None] < lengths[:, None]
    return qkv[0], qkv[1], qkv[2], valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_native_scores_equal_the_pytorch_twin_bit_for_bit(dtype, autocast):
    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        B, H, N, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 40), (1, 7), (3, 200), (1, 33)))
        q, k, v, valid = _qkv(B, H, N, d, dtype, g, mask=trial % 2 == 1)
        P = 1 + trial % 3
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = torch.ops.ats_vit.cls_value_scores(q, k, v, valid, 0.3, P)
            twin = class_attention_value_norm_reference(q, k, v, P, valid, 0.3)
        assert ours.dtype == twin.dtype == torch.float64
        assert torch.equal(ours, twin), (trial, (ours - twin).abs().max())


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("mask", [False, True])
def test_native_selection_returns_what_the_twin_returns(packed, mask, monkeypatch):
    """Scores, picks, kept rows, positions, layout and the kept queries of one ATS block."""
    g = torch.Generator().manual_seed(2)
    for trial in range(10):
        B, H, N, d, P = int(torch.randint(1, 20, (1,), generator=g)), 3, 60, 8, 1 + trial % 2
        q, k, v, valid = _qkv(B, H, N, d, torch.float32, g, mask)
        if valid is not None and packed:  # a packed batch: real rows numbered image after image
            index = (valid.flatten().cumsum(0).view_as(valid) - 1).masked_fill(~valid, 0)
        else:
            index = torch.arange(B * N).view(B, N)
        positions = torch.randperm(B * (N - P), generator=g).view(B, N - P)
        tokens = Tokens(torch.empty(0), Layout(index, valid, packed), positions)
        budget = torch.randint(1, N, (B,), generator=g) if trial % 2 else 7
        args = (q, k, v, tokens, P, 0.3, budget, inverse_transform_sampling, class_attention_value_norm)
        ours = select(*args)
        with monkeypatch.context() as m:
            m.setattr(native, "available", lambda: False)
            twin = select(*args)
        for a, b in [(ours[0], twin[0]), (ours[2], twin[2]), (ours[3], twin[3]), (ours[1].index, twin[1].index)]:
            assert a.shape == b.shape and torch.equal(a, b)
        assert (ours[1].valid is None) == (twin[1].valid is None) and ours[1].packed == twin[1].packed
        if twin[1].valid is not None:
            assert torch.equal(ours[1].valid, twin[1].valid)


def _packed(counts, heads, width, dtype, g):
    """Packed rows (T, H, d) of images holding ``counts`` rows, as strided views of one
    projection (T, 3, H, d), the way a block's qkv splits them; and the offsets (B + 1,)."""
    rows = torch.randn(int(sum(counts)), 3, heads, width, generator=g).to(dtype)
    return rows.unbind(1), torch.tensor([0] + counts).cumsum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_native_varlen_attention_equals_the_twin_bit_for_bit_and_per_image_softmax(dtype):
    """Kept queries over entering keys, counts that differ per image (one image of a single
    row among them): the native kernel gives the twin's bits, and both equal each image's own
    softmax attention computed in float64."""
    g = torch.Generator().manual_seed(0)
    k_counts = [197, 1, 60, 130, 197, 3]
    q_counts = [120, 1, 60, 7, 197, 2]
    (_, k, v), cu_k = _packed(k_counts, 3, 16, dtype, g)
    (q, _, _), cu_q = _packed(q_counts, 3, 16, dtype, g)
    ours = torch.ops.ats_vit.varlen_attention(q, k, v, cu_q, cu_k, 0.25)
    twin = varlen_attention_reference(q, k, v, cu_q, cu_k, 0.25)
    assert ours.shape == q.shape and torch.equal(ours, twin)
    for b in range(len(q_counts)):
        qi, ki, vi = (t[a:e].double().transpose(0, 1) for t, a, e in
                      ((q, cu_q[b], cu_q[b + 1]), (k, cu_k[b], cu_k[b + 1]), (v, cu_k[b], cu_k[b + 1])))
        want = ((0.25 * qi @ ki.transpose(1, 2)).softmax(-1) @ vi).transpose(0, 1)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
        assert (ours[cu_q[b]:cu_q[b + 1]].double() - want).abs().max() <= tol, b


def test_without_a_compiler_the_twin_is_used_with_one_warning(tmp_path):
    """A failed build (here: a source that does not compile) warns once and falls back."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    code = f"""
import warnings, torch
from ats_vit.core import native
native.SOURCES = [{str(broken)!r}]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert not native.available() and not native.available()
assert len(caught) == 1 and "native ops unavailable" in str(caught[0].message), caught
from ats_vit.core.sampling import inverse_transform_sampling, inverse_transform_reference
s = torch.rand(4, 30) ** 3
assert torch.equal(inverse_transform_sampling(s, 9), inverse_transform_reference(s, torch.full((4,), 9)))
from ats_vit.core.block import varlen_attention, varlen_attention_reference
q, k, v = (torch.randn(30, 2, 8) for _ in range(3))
counts, cu = torch.tensor([10, 20]), torch.tensor([0, 10, 30])
assert torch.equal(varlen_attention(q, k, v, counts, counts, 20, 20, 0.3), varlen_attention_reference(q, k, v, cu, cu, 0.3))
print("fallback ok")
"""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "fallback ok" in done.stdout, done.stderr[-2000:]
