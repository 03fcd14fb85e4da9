"""Packed attention: grouped by token count only when that saves work, and exact either way."""
import pytest
import torch
from torch import nn

import ats_vit.block as block


class _Attn(nn.Module):
    fused_attn = True
    scale = 0.125
    attn_drop = nn.Dropout(0.0)


def _valid(lengths, width):
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("lengths,calls", [([100] * 16 + [10] * 16, 2),  # very different counts: grouped
                                           ([100] * 16 + [95] * 16, 1)])  # similar counts: one call
def test_grouped_attention_matches_each_image_alone(monkeypatch, lengths, calls):
    seen = []
    sdpa = block._sdpa
    monkeypatch.setattr(block, "_sdpa", lambda *a: seen.append(a[1].shape[0]) or sdpa(*a))
    g = torch.Generator().manual_seed(0)
    B, H, N, d = len(lengths), 2, max(lengths), 8
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    valid = _valid(lengths, N)
    out = block._attend(_Attn(), q, k, v, valid, valid, grouped=True)
    assert len(seen) == calls
    for b, n in enumerate(lengths):
        alone = torch.softmax(q[b, :, :n] @ k[b, :, :n].transpose(-1, -2) * 0.125, dim=-1) @ v[b, :, :n]
        assert torch.allclose(out[b, :, :n], alone, atol=1e-12)
