"""Out-of-range values get the same clear error on every backend; edge values that are valid give finite results
that agree with the reference.

Every case runs on each backend this machine has for the op (reference, the compiled cpu ops, and triton under
TRITON_INTERPRET=1), so a value that one backend rejects and another turns into NaN, a bigger output, a
ZeroDivisionError or unwritten memory is caught here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import assert_rel_close, poisoned_allocations

import flagdit_kernels as fk
from flagdit_kernels.ops.attention import MAX_SOFTMAX_SCALE

NAN, INF = float("nan"), float("inf")
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

X = torch.randn(7, 16)
W = torch.randn(16)
CU = torch.tensor([0, 3, 7], dtype=torch.int32)
PER_SAMPLE = torch.randn(2, 16)
POS = torch.arange(7)
Q, K, V = torch.randn(7, 2, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
FREQS = fk.rope_freqs(16, POS)
PACKED = fk.pack([torch.randn(3, 4, 4), torch.randn(3, 2, 4, 2)], 2, backend="reference")
TOKENS = torch.randn(PACKED.kind.shape[0], 12)


def backends(op: str) -> list[str]:
    return fk.available_backends(op, "cpu")


def _replace(**fields) -> fk.Packed:
    return dataclasses.replace(PACKED, **fields)


# (op, call(backend), error type, message pattern)
CASES = [
    ("rms_norm", lambda b: fk.rms_norm(X, W, eps=NAN, backend=b), ValueError, "eps must be a finite number >= 0"),
    ("rms_norm", lambda b: fk.rms_norm(X, W, eps=INF, backend=b), ValueError, "eps must be a finite number"),
    ("rms_norm", lambda b: fk.rms_norm(X, W, eps=True, backend=b), TypeError, "eps must be a number, got bool"),
    ("rms_norm_modulate", lambda b: fk.rms_norm_modulate(X, W, PER_SAMPLE, eps=NAN, cu_seqlens=CU, backend=b),
     ValueError, "eps must be a finite"),
    ("rms_norm_modulate", lambda b: fk.rms_norm_modulate(X, W, torch.randn(3, 7, 16), backend=b),
     ValueError, r"scale of shape \(3, 7, 16\) does not broadcast to x of shape \(7, 16\)"),
    ("rms_norm_modulate", lambda b: fk.rms_norm_modulate(X, W, torch.randn(1, 7, 16), backend=b),
     ValueError, "scale of shape .* does not broadcast"),
    ("rms_norm_modulate", lambda b: fk.rms_norm_modulate(X, W, torch.randn(7, 16), torch.randn(2, 7, 16), backend=b),
     ValueError, "shift of shape .* does not broadcast"),
    ("layer_norm_modulate", lambda b: fk.layer_norm_modulate(X, PER_SAMPLE, eps=NAN, cu_seqlens=CU, backend=b),
     ValueError, "eps must be a finite"),
    ("layer_norm_modulate", lambda b: fk.layer_norm_modulate(X, torch.randn(3, 7, 16), backend=b),
     ValueError, r"scale of shape \(3, 7, 16\) does not broadcast to x of shape \(7, 16\)"),
    ("gated_residual_rms_norm", lambda b: fk.gated_residual_rms_norm(X, X, W, torch.randn(4, 1, 16), backend=b),
     ValueError, "gate of shape .* does not broadcast"),
    ("gated_residual_rms_norm", lambda b: fk.gated_residual_rms_norm(X, X, W, PER_SAMPLE, eps=-INF, cu_seqlens=CU,
                                                                     backend=b), ValueError, "eps must be a finite"),
    ("rope_freqs", lambda b: fk.rope_freqs(16, POS, theta=NAN, backend=b), ValueError, "theta must be a finite"),
    ("rope_freqs", lambda b: fk.rope_freqs(16, POS, theta=INF, backend=b), ValueError, "theta must be a finite"),
    ("rope_freqs", lambda b: fk.rope_freqs(16, POS, linear_factor=NAN, backend=b), ValueError, "linear_factor must"),
    ("rope_freqs", lambda b: fk.rope_freqs(16, POS, linear_factor=INF, backend=b), ValueError, "linear_factor must"),
    ("rope_freqs", lambda b: fk.rope_freqs(16, POS, ntk_factor=NAN, backend=b), ValueError, "ntk_factor must"),
    ("rope_freqs", lambda b: fk.rope_freqs(16, POS, ntk_factor=INF, backend=b), ValueError, "ntk_factor must"),
    ("rope_freqs", lambda b: fk.rope_freqs(16, POS, theta=True, backend=b), TypeError, "theta must be a number"),
    ("rope_freqs", lambda b: fk.rope_freqs(True, POS, backend=b), ValueError, "head_dim must be a positive int"),
    ("qk_norm_rope", lambda b: fk.qk_norm_rope(Q, K, FREQS, eps=-1.0, backend=b), ValueError, "eps must be a finite"),
    ("qk_norm_rope", lambda b: fk.qk_norm_rope(Q, K, FREQS, eps=NAN, backend=b), ValueError, "eps must be a finite"),
    ("qk_norm_rope", lambda b: fk.qk_norm_rope(Q, K, FREQS, norm="rms_norm", eps=INF, backend=b), ValueError,
     "eps must be a finite"),
    ("qk_norm_rope", lambda b: fk.qk_norm_rope(Q, K, FREQS, torch.nn.LayerNorm(32, eps=NAN),
                                               torch.nn.LayerNorm(32, eps=NAN), backend=b),
     ValueError, "q_norm.eps must be a finite"),
    ("pack", lambda b: fk.pack([torch.randn(0, 4, 4)], 2, backend=b), ValueError, r"with C >= 1, got \(0, 4, 4\)"),
    ("pack", lambda b: fk.pack([torch.randn(3, 4, 4)], True, backend=b), ValueError, "patch_size must be a positive"),
    ("unpack", lambda b: fk.unpack(TOKENS[:, :4], PACKED, True, backend=b), ValueError,
     "out_channels must be a positive int, got True"),
    ("unpack", lambda b: fk.unpack(TOKENS, PACKED, 3.0, backend=b), ValueError, "out_channels must be a positive int"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(shapes=[(3, 5, 4), (3, 2, 4, 2)]), 3, backend=b), ValueError,
     r"packed.shapes\[0\] of shape \(3, 5, 4\): H and W must be positive multiples of patch_size=2"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(shapes=[(3, 4, 4), (3, 2, 4, 3)]), 3, backend=b), ValueError,
     r"packed.shapes\[1\]"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(shapes=[(3, 4, 4), (3, 4, 4)]), 3, backend=b), ValueError,
     "packed.kind has 15 tokens but packed.shapes give 12"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(shapes=[(3, 4, 4), (3, 4, 4), (3, 2, 4)]), 3, backend=b),
     ValueError, "packed.cu_seqlens must have 4 entries for 3 items"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(patch_size=0), 3, backend=b), ValueError,
     "packed.patch_size must be a positive int, got 0"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(patch_size=-2), 3, backend=b), ValueError, "packed.patch_size"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(max_seqlen=3), 3, backend=b), ValueError, "packed.max_seqlen"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(patch_rows=PACKED.patch_rows[:-1]), 3, backend=b), ValueError,
     "packed.patch_rows has 7 rows"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(cu_seqlens=torch.tensor([0, 9, 15], dtype=torch.int32)), 3,
                                   backend=b), ValueError, r"packed.cu_seqlens \(\[0, 9, 15\]\) disagrees"),
    ("unpack", lambda b: fk.unpack(TOKENS, _replace(nextline=1), 3, backend=b), TypeError, "packed.nextline must"),
    ("varlen_attention", lambda b: fk.varlen_attention(Q, K, V, CU, 4, 1e10, backend=b), ValueError,
     r"softmax_scale must be a finite number in \[0, 10000\], got 10000000000.0"),
    ("varlen_attention", lambda b: fk.varlen_attention(Q, K, V, CU, 4, INF, backend=b), ValueError, "softmax_scale"),
    ("varlen_attention", lambda b: fk.varlen_attention(Q, K, V, CU, 4, True, backend=b), TypeError, "softmax_scale"),
    ("varlen_attention", lambda b: fk.varlen_attention(Q, K, V, CU, True, backend=b), ValueError,
     "max_seqlen must be a non-negative int, got True"),
]  # fmt: skip


@pytest.mark.parametrize(("op", "call", "error", "match"), CASES, ids=[f"{op}-{i}" for i, (op, *_) in enumerate(CASES)])
def test_every_backend_raises_the_same_clear_error(op, call, error, match):
    for backend in backends(op):
        with pytest.raises(error, match=match):
            call(backend)


def _agree(op: str, call) -> None:
    """``call(backend)`` gives finite results on every backend, equal to the reference's (rel-L2 < 1e-5)."""
    with poisoned_allocations():
        results = {b: call(b) for b in backends(op)}
    expected = results.pop("reference")
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)
    for backend, got in results.items():
        for g, e in zip(as_tuple(got), as_tuple(expected)):
            assert_rel_close(g, e, 1e-5, f"{op} on {backend}")


@FEW
@given(eps=st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 1e-12, 1e30]))
def test_norm_eps_is_rejected_exactly_when_out_of_range(eps):
    valid = math.isfinite(eps) and eps >= 0
    for op, call in (
        ("rms_norm", lambda b: fk.rms_norm(X, W, eps=eps, backend=b)),
        ("rms_norm_modulate", lambda b: fk.rms_norm_modulate(X, W, PER_SAMPLE, eps=eps, cu_seqlens=CU, backend=b)),
        ("layer_norm_modulate", lambda b: fk.layer_norm_modulate(X, PER_SAMPLE, eps=eps, cu_seqlens=CU, backend=b)),
        ("qk_norm_rope", lambda b: fk.qk_norm_rope(Q, K, FREQS, eps=eps, backend=b)),
    ):
        if valid:
            _agree(op, call)
        else:
            for backend in backends(op):
                with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
                    call(backend)


@FEW
@given(
    name=st.sampled_from(["theta", "linear_factor", "ntk_factor"]),
    value=st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1e-110, 1e-42]) | st.floats(-1e300, 1e300),
)
def test_rope_factors_give_a_finite_table_or_an_error(name, value):
    """NaN, inf, zero and negative factors are errors; so are finite ones whose fp32 angles overflow (on CPU
    tensors, where the table is checked): no value gives a table holding NaN."""
    call = lambda b: fk.rope_freqs(16, POS * 1000, **{name: value}, backend=b)
    if not (math.isfinite(value) and value > 0):
        with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
            call("reference")
        return
    try:
        table = call("reference")
    except ValueError as e:
        assert "overflow float32" in str(e)
    else:
        assert torch.isfinite(table).all()


@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0, MAX_SOFTMAX_SCALE])
def test_softmax_scales_up_to_the_bound_agree_with_the_reference(scale):
    """At the bound, with QK-normed inputs (unit RMS, one query equal to a key: |q.k| = Dh), every backend stays
    finite and matches the reference."""
    d = 64
    q = torch.nn.functional.normalize(torch.randn(9, 2, d), dim=-1) * d**0.5
    k = torch.nn.functional.normalize(torch.randn(9, 2, d), dim=-1) * d**0.5
    k[4] = q[4]
    v = torch.randn(9, 2, d)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    _agree("varlen_attention", lambda b: fk.varlen_attention(q, k, v, cu, 5, scale, backend=b))


@pytest.mark.parametrize("bad_kind", [-100, -1, 3, 127])
def test_embed_packed_treats_an_out_of_range_kind_alike_on_every_backend(bad_kind):
    """A kind outside {0, 1, 2} is a patch row on every backend: no read outside the two-row placeholder table."""
    kind = torch.tensor([0, 1, bad_kind, 2, 0, bad_kind], dtype=torch.int8)
    patches, weight, bias, table = torch.randn(6, 12), torch.randn(8, 12), torch.randn(8), torch.randn(2, 8)
    _agree("embed_packed", lambda b: fk.embed_packed(patches, kind, weight, bias, table, backend=b))
    out = fk.embed_packed(patches, kind, weight, bias, table, backend="reference")
    linear = patches @ weight.T + bias
    assert torch.allclose(out[kind == bad_kind], linear[kind == bad_kind])
    assert torch.equal(out[1], table[0]) and torch.equal(out[3], table[1])


def test_unpack_of_a_consistent_hand_built_packed_still_works():
    """The checks accept what fk.pack builds and equivalent hand-built values (a list of shapes, no patch_rows
    for the compiled and Triton backends, which do not read it)."""
    for backend in backends("unpack"):
        want = fk.unpack(TOKENS, PACKED, 3, backend=backend)
        packed = _replace(shapes=[list(s) for s in PACKED.shapes])
        if backend != "reference":
            packed = dataclasses.replace(packed, patch_rows=None)
        for got, exp in zip(fk.unpack(TOKENS, packed, 3, backend=backend), want):
            assert torch.equal(got, exp)
