"""One float64 rule for every op (DESIGN.md, Numerics): kernels that compute in fp32 (the Triton kernels that
compute, the CUDA C++ rms_norm) do not take float64, so the default dispatch runs a backend that computes in
float64 and naming such a kernel for float64 inputs is a ValueError that says which dtypes it takes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support.helpers import DEVICE, fresh

import flagdit_kernels as fk
from flagdit_kernels import _dispatch
from flagdit_kernels import reference as ref

COPYING = ("pack", "unpack", "embed_packed")  # copies (and a float64 GEMM): exact in any dtype
# Every other op with a kernel computes (a new op is held to the rule without being listed here).
COMPUTING = [op for op in _dispatch.ops() if {"triton", "cuda"} & set(_dispatch.registered_backends(op))]
COMPUTING = [op for op in COMPUTING if op not in COPYING]


def _like(dtype: torch.dtype) -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 64))


@pytest.fixture
def no_forced_backend(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    _dispatch.reload_environment()
    yield
    monkeypatch.undo()
    _dispatch.reload_environment()


@pytest.mark.parametrize("op", COMPUTING)
def test_fp32_kernels_decline_float64(op, no_forced_backend):
    impls = _dispatch._OPS[op].impls
    for name in ("triton", "cuda"):
        if name in impls:
            assert torch.float64 not in impls[name].dtypes and torch.float32 in impls[name].dtypes, (op, name)
    # The default for float64 CUDA tensors is a backend that computes in float64.
    assert _dispatch.resolve(op, _like(torch.float64)).backend == "reference"
    if not _dispatch._missing(impls["triton"]):
        with pytest.raises(ValueError, match=f"{op}: backend 'triton' cannot run here: .* not float64"):
            _dispatch.resolve(op, _like(torch.float64), backend="triton")
        assert _dispatch.resolve(op, _like(torch.float32)).backend in ("triton", "cuda")


@pytest.mark.parametrize("op", COPYING)
def test_copy_kernels_take_float64(op):
    assert _dispatch._OPS[op].impls["triton"].dtypes is None


def test_the_cpu_rms_norm_computes_float64_in_float64():
    x, w = fresh((9, 40), torch.float64, seed=1), fresh((40,), torch.float64, seed=2)
    want = ref.rms_norm(x, w)  # a true float64 computation (DESIGN.md, Reference precision)
    for backend in fk.available_backends("rms_norm", "cpu"):
        if backend == "triton":
            continue
        out = fk.rms_norm(x, w, backend=backend)
        assert ((out - want).norm() / want.norm()).item() < 1e-12, backend


@pytest.mark.skipif("triton" not in fk.available_backends("rms_norm", DEVICE), reason="needs a Triton backend")
def test_naming_triton_for_float64_calls_says_why():
    x = fresh((6, 32), torch.float64, seed=3)
    w, scale = fresh((32,), torch.float64, seed=4), fresh((2, 32), torch.float64, seed=5)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    freqs = fk.rope_freqs(16, torch.arange(6, device=DEVICE))
    calls = {
        "rms_norm": lambda: fk.rms_norm(x, w, backend="triton"),
        "rms_norm_modulate": lambda: fk.rms_norm_modulate(x, w, scale, cu_seqlens=cu, backend="triton"),
        "gated_residual_rms_norm": lambda: fk.gated_residual_rms_norm(x, x, w, scale, cu_seqlens=cu, backend="triton"),
        "layer_norm_modulate": lambda: fk.layer_norm_modulate(x, scale, cu_seqlens=cu, backend="triton"),
        "apply_rope": lambda: fk.apply_rope(x.view(6, 2, 16), freqs, backend="triton"),
    }
    for op, call in calls.items():
        with pytest.raises(ValueError, match=f"{op}: backend 'triton' cannot run here: it takes .*, not float64"):
            call()
    # Without a name, float64 runs where it is computed in float64: equal to the reference.
    assert torch.equal(
        fk.rms_norm_modulate(x, w, scale, cu_seqlens=cu), ref.rms_norm_modulate(x, w, scale, None, ref.norms.EPS, cu)
    )
