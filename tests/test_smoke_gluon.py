"""Every Gluon kernel against the float64 reference, launched directly (not through the autotuner), before any
of them may be trusted: benchmarks/gpu_check.sh runs this file first in its smoke phase, in a process of its
own (a faulting kernel must not take the other smoke cases with it). Gluon never runs under the interpreter
and needs an sm_90 GPU: elsewhere every case is skipped.

Cases: each Gluon forward config at Dh 64 and 128, bf16 and fp16, GQA 4/2, a packed batch with a one-token
sequence, tails of every kind (odd lengths; a query tile whose second consumer has no row), with and without
text (an empty caption included); every output (out, lse, o_text, lse_text) poisoned with NaN beforehand.
"""

from __future__ import annotations

import math

import pytest
import torch
from support.helpers import TOLERANCE, assert_rel_close, fresh, offsets_of

from flagdit_kernels.reference import attention as reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="Gluon kernels run on sm_90 GPUs only",
)

LENS = [1, 130, 257, 64]
TEXT_LENS = [7, 0, 128, 33]
HEADS, KV_HEADS = 4, 2
LOG2E = 1.4426950408889634


def _configs():
    from flagdit_kernels.triton.attention import gluon_fwd as gluon_fwd

    for d, configs in gluon_fwd.CONFIGS.items():
        for config in configs:
            for dtype in (torch.bfloat16, torch.float16):
                for text in (False, True):
                    yield pytest.param(d, config, dtype, text, id=f"D{d}-{config}-{str(dtype)[6:]}-text{int(text)}")


def _text_reference(q, tk, tv, lens, text_lens):
    """o_text (T, H, D) and its natural-log LSE (H, T), float64; zeros for a sample without text."""
    T, H, D = q.shape
    group = H // tk.shape[1]
    o = torch.zeros(T, H, D, dtype=torch.float64, device=q.device)
    lse = torch.zeros(H, T, dtype=torch.float64, device=q.device)
    qs, ts = 0, 0
    for n, m in zip(lens, text_lens):
        if m:
            qq = q[qs : qs + n].double().transpose(0, 1)
            kk = tk[ts : ts + m].double().repeat_interleave(group, 1).transpose(0, 1)
            vv = tv[ts : ts + m].double().repeat_interleave(group, 1).transpose(0, 1)
            s = qq @ kk.transpose(1, 2) / math.sqrt(D)
            o[qs : qs + n] = (torch.softmax(s, -1) @ vv).transpose(0, 1)
            lse[:, qs : qs + n] = torch.logsumexp(s, -1)
        qs, ts = qs + n, ts + m
    return o, lse


@pytest.mark.parametrize(("head_dim", "config", "dtype", "text"), list(_configs()))
def test_gluon_forward_matches_reference(head_dim, config, dtype, text):
    from flagdit_kernels.triton.attention import gluon_fwd as gluon_fwd

    T, B = sum(LENS), len(LENS)
    q = fresh((T, HEADS, head_dim), dtype)
    k, v = fresh((T, KV_HEADS, head_dim), dtype), fresh((T, KV_HEADS, head_dim), dtype)
    cu = offsets_of(LENS, "cuda")
    scale = 1 / math.sqrt(head_dim)
    nan = lambda *shape, dt=dtype: torch.full(shape, float("nan"), dtype=dt, device="cuda")
    out, lse = nan(T, HEADS, head_dim), nan(HEADS, T, dt=torch.float32)
    if text:
        tk, tv = fresh((sum(TEXT_LENS), KV_HEADS, head_dim), dtype), fresh((sum(TEXT_LENS), KV_HEADS, head_dim), dtype)
        tcu, gate = offsets_of(TEXT_LENS, "cuda"), fresh((HEADS,), torch.float32, scale=0.5)
        ot, lt = nan(T, HEADS, head_dim), nan(HEADS, T, dt=torch.float32)
        tg = torch.tanh(gate)
    else:
        tk, tv, tcu, ot, lt, tg = k, v, cu, out, lse, lse
    gluon_fwd.launch(config, q, k, v, tk, tv, tg, out, ot, lse, lt, cu, tcu, scale * LOG2E, LOG2E * scale, T,
                     HEADS // KV_HEADS, B, text, torch.cuda.get_device_properties(0).multi_processor_count)  # fmt: skip
    torch.cuda.synchronize()

    extra = {}
    if text:
        extra = dict(text_k=tk, text_v=tv, text_cu_seqlens=tcu, text_max_seqlen=max(TEXT_LENS), gate=gate)
    want, want_lse = reference.varlen_attention(q, k, v, cu, max(LENS), scale, return_lse=True, **extra)
    tol = TOLERANCE["attention"][dtype]
    assert_rel_close(out, want, tol, "out")
    assert_rel_close(lse, want_lse, tol, "lse")
    if text:
        want_ot, want_lt = _text_reference(q, tk, tv, LENS, TEXT_LENS)
        assert_rel_close(ot, want_ot, tol, "o_text")
        assert_rel_close(lt, want_lt, tol, "lse_text")
        # A sample without text adds exactly nothing.
        empty = slice(LENS[0], LENS[0] + LENS[1])
        assert (ot[empty] == 0).all() and (lt[:, empty] == 0).all()
