"""Native (C++) kernels, compiled on first use with ``torch.utils.cpp_extension`` and cached.

They register ops under ``torch.ops.ats_vit``. Each has a pure-PyTorch twin that gives the same
results and is used where the native build is impossible (no compiler: one warning) or not
wanted (``ATS_VIT_NATIVE=0``), and on devices the native kernel does not serve.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

SOURCES = [Path(__file__).with_name("csrc") / name for name in ("select.cpp", "varlen.cpp")]
# -ffp-contract=off: no fused multiply-add, so float arithmetic rounds as PyTorch's does.
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]


_loaded: Optional[bool] = None  # None: not tried yet


def available() -> bool:
    """Whether the native ops are loaded (building them at the first call outside a
    ``torch.compile`` trace; later runs reuse the build in ``torch.utils.cpp_extension``'s
    cache, ``TORCH_EXTENSIONS_DIR``)."""
    global _loaded
    if _loaded is None and not torch.compiler.is_compiling():
        _loaded = os.environ.get("ATS_VIT_NATIVE", "1") != "0" and _load()
    return bool(_loaded)


def _load() -> bool:
    # cpp_extension warns on import that a CPU-only machine has no CUDA runtime: true, and moot here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        load(name="ats_vit_native", sources=[str(s) for s in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as e:  # no compiler or ninja, or a failed build: the twins compute the same
        warnings.warn(f"ats_vit: native ops unavailable ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); using their "
                      "pure-PyTorch versions, which compute the same more slowly", RuntimeWarning)
        return False

    @torch.library.register_fake("ats_vit::inverse_transform")
    def _(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        kept = torch.library.get_ctx().new_dynamic_size()
        return scores.new_empty((scores.shape[0], kept), dtype=torch.long)

    @torch.library.register_fake("ats_vit::cls_value_scores")
    def _(q, k, v, valid, scale, num_prefix):
        return q.new_empty((q.shape[0], k.shape[2] - num_prefix), dtype=torch.float64)

    @torch.library.register_fake("ats_vit::ats_select")
    def _(q, k, v, valid, scale, num_prefix, budget, layout_index, positions, packed):
        ctx = torch.library.get_ctx()
        B, H, _, d = q.shape
        kept, rows = ctx.new_dynamic_size(), ctx.new_dynamic_size()
        width = num_prefix + kept
        return (q.new_empty((B, H, width, d)), q.new_empty((B, width), dtype=torch.long),
                q.new_empty((rows,), dtype=torch.long),
                q.new_empty((B, kept), dtype=torch.long), q.new_empty((ctx.new_dynamic_size(), width), dtype=torch.bool),
                q.new_empty((B, width), dtype=torch.long))

    @torch.library.register_fake("ats_vit::varlen_attention")
    def _(q, k, v, cu_q, cu_k, scale):
        return torch.empty_like(q)

    # The class row's q kᵀ, so torch.utils.flop_counter counts what the MAC model counts.
    @register_flop_formula([torch.ops.ats_vit.cls_value_scores, torch.ops.ats_vit.ats_select])
    def _(q_shape, k_shape, *args, **kwargs) -> int:
        batch, heads, _, head_dim = q_shape
        return 2 * batch * heads * k_shape[2] * head_dim

    return True
