"""Packed attention: grouped by token count only when that saves work, and exact either way."""
import pytest
import torch

import ats_vit.core.block as block


def _valid(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("lengths,calls", [([100] * 16 + [10] * 16, 2),  # very different counts: grouped
                                           ([100] * 16 + [95] * 16, 1)])  # similar counts: one call
def test_grouped_attention_matches_each_image_alone(monkeypatch, lengths, calls):
    seen = []
    sdpa = block.sdpa
    monkeypatch.setattr(block, "sdpa", lambda *a: seen.append(a[0].shape[0]) or sdpa(*a))
    g = torch.Generator().manual_seed(0)
    B, H, N, d = len(lengths), 2, max(lengths), 8
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    valid = _valid(lengths, N)
    out = block.attend(q, k, v, valid, valid, True, scale=0.125)
    assert len(seen) == calls
    for b, n in enumerate(lengths):
        alone = torch.softmax(q[b, :, :n] @ k[b, :, :n].transpose(-1, -2) * 0.125, dim=-1) @ v[b, :, :n]
        assert torch.allclose(out[b, :, :n], alone, atol=1e-12)
