"""Every Gluon kernel against the float64 reference, launched directly (not through the autotuner), before any
of them may be trusted: benchmarks/gpu_check.sh runs this file first in its smoke phase, in a process of its
own (a faulting kernel must not take the other smoke cases with it). Gluon never runs under the interpreter
and needs an sm_90 GPU: elsewhere every case is skipped.

Cases: each Gluon forward config at Dh 64 and 128, bf16 and fp16, GQA 4/2, a packed batch with a one-token
sequence, tails of every kind (odd lengths; a query tile whose second consumer has no row), with and without
text (an empty caption included); every output (out, lse, o_text, lse_text) poisoned with NaN beforehand; and
the same with non-finite keys and values in the rows a sample's last key tile reads past its end (the next
sample's, its text's), which must not change that sample's results; and scores that grow along each sequence
(the lazy rescale taken and skipped).
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


def _launch(config, head_dim, dtype, text, poison=False, growing=False):
    """Runs the Gluon forward on fresh inputs (outputs poisoned with NaN first); returns its outputs, the float64
    references computed from the inputs as drawn, and the token rows whose results must match them. With
    ``poison``, after the draw, the self keys/values of samples 1 and 3 and the text keys/values of sample 2 are
    made non-finite (+inf keys, NaN and -inf values): the key tiles of samples 0 and 2 run past their ends into
    exactly those rows (and sample 0's text tile into sample 2's text), which must not change their results; the
    poisoned samples' own results are not checked. With ``growing``, q is scaled up and each sequence's keys
    grow along it (up to 7x), so the row max grows by more than the lazy rescale's threshold many times."""
    from flagdit_kernels.triton.attention import gluon_fwd as gluon_fwd

    T, B = sum(LENS), len(LENS)
    q = fresh((T, HEADS, head_dim), dtype)
    k, v = fresh((T, KV_HEADS, head_dim), dtype), fresh((T, KV_HEADS, head_dim), dtype)
    if growing:
        q = (q.float() * 4).to(dtype)
        along = torch.cat([torch.arange(n, device="cuda") / n for n in LENS])
        k = (k.float() * (1 + 6 * along)[:, None, None]).to(dtype)
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
    extra = {}
    if text:
        extra = dict(text_k=tk, text_v=tv, text_cu_seqlens=tcu, text_max_seqlen=max(TEXT_LENS), gate=gate)
    want = reference.varlen_attention(q, k, v, cu, max(LENS), scale, return_lse=True, **extra)
    if text:
        want = (*want, *_text_reference(q, tk, tv, LENS, TEXT_LENS))
    rows = torch.arange(T, device="cuda")
    if poison:
        k, v = k.clone(), v.clone()
        for b in (1, 3):
            _poison(k, v, cu[b].item(), cu[b + 1].item())
        checked = [0] if text else [0, 2]  # with text, sample 2's own text keys are poisoned
        rows = torch.cat([torch.arange(cu[b].item(), cu[b + 1].item(), device="cuda") for b in checked])
        if text:
            tk, tv = tk.clone(), tv.clone()
            tcu_host = tcu.tolist()
            _poison(tk, tv, tcu_host[2], tcu_host[3])
    gluon_fwd.launch(config, q, k, v, tk, tv, tg, out, ot, lse, lt, cu, tcu, scale * LOG2E, LOG2E * scale, T,
                     HEADS // KV_HEADS, B, text, torch.cuda.get_device_properties(0).multi_processor_count)  # fmt: skip
    torch.cuda.synchronize()
    got = (out, lse, ot, lt) if text else (out, lse)
    return got, want, rows


def _poison(k, v, lo, hi):
    """Non-finite keys and values in rows lo..hi: +inf keys, NaN values, -inf in the second half."""
    mid = (lo + hi) // 2
    k[lo:hi] = float("inf")
    v[lo:mid], v[mid:hi] = float("nan"), float("-inf")


def _check(got, want, rows, dtype):
    tol = TOLERANCE["attention"][dtype]
    for name, g, w in zip(("out", "lse", "o_text", "lse_text"), got, want):
        if name.startswith("lse"):
            assert_rel_close(g[:, rows], w[:, rows], tol, name)
        else:
            assert_rel_close(g[rows], w[rows], tol, name)


@pytest.mark.parametrize(("head_dim", "config", "dtype", "text"), list(_configs()))
def test_gluon_forward_matches_reference(head_dim, config, dtype, text):
    got, want, rows = _launch(config, head_dim, dtype, text)
    _check(got, want, rows, dtype)
    if text:
        # A sample without text adds exactly nothing.
        ot, lt = got[2], got[3]
        empty = slice(LENS[0], LENS[0] + LENS[1])
        assert (ot[empty] == 0).all() and (lt[:, empty] == 0).all()


@pytest.mark.parametrize(("head_dim", "config", "dtype", "text"), list(_configs()))
def test_gluon_forward_never_reads_a_neighbours_keys(head_dim, config, dtype, text):
    """Key tiles past a sequence's end hold the next sequence's rows: non-finite values there (scores masked,
    P zero) must not reach this sequence's results (0 * NaN in the PV product)."""
    got, want, rows = _launch(config, head_dim, dtype, text, poison=True)
    _check(got, want, rows, dtype)


@pytest.mark.parametrize(("head_dim", "config", "dtype", "text"), list(_configs()))
def test_gluon_forward_rescales_when_the_max_grows(head_dim, config, dtype, text):
    """Scores that grow along every sequence: the lazy rescale (a row's output rescaled only when its max grew by
    more than 2^8, a warp skipping the products when none of its rows did) is taken and skipped both."""
    got, want, rows = _launch(config, head_dim, dtype, text, growing=True)
    _check(got, want, rows, dtype)
