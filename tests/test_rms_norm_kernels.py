"""RMSNorm family kernels (triton, cuda) against the float64 reference: forward and every gradient.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (shapes kept small); without it, and for
the CUDA C++ backend without a GPU, those parametrizations skip with a reason.
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import (
    DEVICE,
    KERNEL_DTYPES,
    ON_GPU,
    backend_params,
    compare_with_reference,
    fresh,
    make_inputs,
    offsets_of,
    poisoned_allocations,
)

import flagdit_kernels as fk
from flagdit_kernels import _dispatch
from flagdit_kernels import reference as ref

OPS = ("rms_norm", "rms_norm_modulate", "gated_residual_rms_norm")
KERNEL_BACKENDS = ("triton", "cuda")


def _layout(row: tuple) -> tuple:
    """(x shape, parameter shape, cu_seqlens or None, flag) of a layout table row; the optional fourth entry (with
    shift, tanh gate) defaults to True."""
    x_shape, p_shape, lengths, flag = (*row, True)[:4]
    return x_shape, p_shape, offsets_of(lengths) if lengths is not None else None, flag


# ------------------------------------------------------------------------------------------------- rms_norm

# (rows, D): odd widths, a non-power-of-two the Flag-DiT configs use, more rows than backward programs.
RMS_SHAPES = [(37, 72), (9, 1000), (3, 2304), (1, 72), (2, 3, 40)]


@pytest.mark.parametrize("backend", backend_params("rms_norm"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no_weight"])
def test_rms_norm(backend, dtype, shape, affine):
    d = shape[-1]
    inputs = make_inputs({"x": shape, "weight": (d,) if affine else None}, dtype)
    compare_with_reference(
        lambda x, weight: fk.rms_norm(x, weight, 1e-5, backend=backend),
        lambda x, weight: ref.rms_norm(x, weight, 1e-5),
        inputs,
        dtype,
    )


@pytest.mark.parametrize("backend", backend_params("rms_norm"))
def test_rms_norm_fp32_weight_with_half_input(backend):
    """Mixed precision as trained: fp32 weight, bf16 activations; the gradient comes back in fp32."""
    x = fresh((11, 72), torch.bfloat16)
    w = fresh((72,), torch.float32, scale=0.5, offset=1.0)
    compare_with_reference(
        lambda x, weight: fk.rms_norm(x, weight, backend=backend),
        lambda x, weight: ref.rms_norm(x, weight),
        {"x": x, "weight": w},
        torch.bfloat16,
    )


@pytest.mark.parametrize("backend", backend_params("rms_norm"))
def test_rms_norm_strided_rows(backend):
    """Rows with a stride larger than D (a column slice of a fused projection) and permuted leading dims."""
    dtype = torch.float32
    buf = fresh((13, 3 * 72), dtype)
    w = fresh((72,), dtype)
    compare_with_reference(
        lambda buf, weight: fk.rms_norm(buf[:, 72:144], weight, backend=backend),
        lambda buf, weight: ref.rms_norm(buf[:, 72:144], weight),
        {"buf": buf, "weight": w},
        dtype,
    )
    x = fresh((5, 4, 72), dtype)
    compare_with_reference(
        lambda x, weight: fk.rms_norm(x.transpose(0, 1), weight, backend=backend),
        lambda x, weight: ref.rms_norm(x.transpose(0, 1), weight),
        {"x": x, "weight": w},
        dtype,
    )


def test_triton_reads_strided_rows_in_place():
    """The launchers' (B, L, D) view keeps the storage of strided inputs (no hidden copy)."""
    pytest.importorskip("triton")
    from flagdit_kernels.triton.norms import _rows_view

    buf = torch.randn(13, 3 * 72)
    x = buf[:, 72:144]
    assert _rows_view(x).data_ptr() == x.data_ptr()
    y = torch.randn(5, 4, 72).transpose(0, 1)
    assert _rows_view(y).data_ptr() == y.data_ptr()
    z = torch.randn(2, 6, 4, 72)[:, ::2]  # (2, 3, 4, 72): the two leading dims merge
    assert _rows_view(z).data_ptr() == z.data_ptr()


@pytest.mark.parametrize("op", OPS)
def test_zero_rows(op):
    if "triton" not in fk.available_backends(op, DEVICE):
        pytest.skip("triton cannot run here")
    x = fresh((0, 72), torch.float32).requires_grad_()
    w = fresh((72,), torch.float32).requires_grad_()
    if op == "rms_norm":
        y = fk.rms_norm(x, w, backend="triton")
    elif op == "rms_norm_modulate":
        y = fk.rms_norm_modulate(x, w, fresh((72,), torch.float32), backend="triton")
    else:
        y = fk.gated_residual_rms_norm(x, x, w, fresh((72,), torch.float32), backend="triton")
    assert y.shape == (0, 72)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


# ---------------------------------------------------------------------------------------- rms_norm_modulate

# name -> (x shape, scale/shift shape, cu_seqlens lengths or None, with shift)
MOD_LAYOUTS = {
    "padded": ((3, 7, 72), (3, 72), None),
    "padded_no_shift": ((3, 7, 72), (3, 72), None, False),
    "packed": ((37, 72), (5, 72), [1, 1, 13, 0, 22]),  # length-1 and empty sequences, crossings of programs
    "packed_no_shift": ((37, 72), (5, 72), [22, 1, 13, 1, 0], False),
    "packed_1000": ((9, 1000), (3, 1000), [4, 1, 4]),
    "packed_2304": ((4, 2304), (2, 2304), [1, 3]),
    "vector": ((9, 72), (72,), None),  # one (D,) vector for every row
    "per_row": ((3, 5, 72), (3, 5, 72), None),  # same shape as x: per-row gradient + sum_to_size path
    "over_batch": ((3, 5, 72), (1, 5, 72), None),  # broadcast over B, varies along L
    "b11d_4d": ((2, 3, 4, 72), (2, 1, 1, 72), None),  # a pattern the (B, L) view cannot express
}


@pytest.mark.parametrize("backend", backend_params("rms_norm_modulate"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(MOD_LAYOUTS))
def test_rms_norm_modulate(backend, dtype, layout):
    x_shape, p_shape, cu, with_shift = _layout(MOD_LAYOUTS[layout])
    d = x_shape[-1]
    inputs = make_inputs(
        {"x": x_shape, "weight": (d,), "scale": p_shape, "shift": p_shape if with_shift else None},
        dtype,
        cu_seqlens=cu,
    )
    compare_with_reference(
        lambda x, weight, scale, shift, cu_seqlens: fk.rms_norm_modulate(
            x, weight, scale, shift, 1e-5, cu_seqlens, backend=backend
        ),
        lambda x, weight, scale, shift, cu_seqlens: ref.rms_norm_modulate(x, weight, scale, shift, 1e-5, cu_seqlens),
        inputs,
        dtype,
    )


@pytest.mark.parametrize("backend", backend_params("rms_norm_modulate"))
def test_rms_norm_modulate_no_weight_strided(backend):
    dtype = torch.float16
    buf = fresh((3, 9, 2 * 72), dtype)
    inputs = {"buf": buf, "scale": fresh((3, 72), dtype), "shift": fresh((3, 72), dtype)}
    compare_with_reference(
        lambda buf, scale, shift: fk.rms_norm_modulate(buf[:, 1:8, 72:], None, scale, shift, backend=backend),
        lambda buf, scale, shift: ref.rms_norm_modulate(buf[:, 1:8, 72:], None, scale, shift),
        inputs,
        dtype,
    )


# ---------------------------------------------------------------------------------- gated_residual_rms_norm

# name -> (h shape, gate shape, cu_seqlens lengths or None, tanh gate)
GATED_LAYOUTS = {
    "padded": ((2, 9, 72), (2, 72), None),
    "padded_identity": ((2, 9, 72), (2, 72), None, False),
    "packed": ((37, 72), (5, 72), [13, 1, 0, 1, 22]),
    "packed_identity": ((37, 72), (5, 72), [0, 1, 35, 1, 0], False),
    "packed_1000": ((9, 1000), (3, 1000), [1, 7, 1]),
    "vector": ((2, 9, 72), (72,), None),
    "per_row": ((6, 72), (6, 72), None),
}


@pytest.mark.parametrize("backend", backend_params("gated_residual_rms_norm"))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(GATED_LAYOUTS))
def test_gated_residual_rms_norm(backend, dtype, layout):
    h_shape, g_shape, cu, tanh_gate = _layout(GATED_LAYOUTS[layout])
    d = h_shape[-1]
    inputs = make_inputs({"residual": h_shape, "h": h_shape, "weight": (d,), "gate": g_shape}, dtype, cu_seqlens=cu)
    compare_with_reference(
        lambda residual, h, weight, gate, cu_seqlens: fk.gated_residual_rms_norm(
            residual, h, weight, gate, 1e-5, tanh_gate, cu_seqlens, backend=backend
        ),
        lambda residual, h, weight, gate, cu_seqlens: ref.gated_residual_rms_norm(
            residual, h, weight, gate, 1e-5, tanh_gate, cu_seqlens
        ),
        inputs,
        dtype,
    )


@pytest.mark.parametrize("backend", backend_params("gated_residual_rms_norm"))
def test_gated_small_gates(backend):
    """Gates near zero (zero-initialized in Lumina) take the series branch of the kernel's tanh."""
    dtype = torch.float32
    inputs = make_inputs({"residual": (2, 5, 72), "h": (2, 5, 72), "weight": None}, dtype)
    inputs["gate"] = fresh((2, 72), dtype, scale=1e-3)
    compare_with_reference(
        lambda residual, h, weight, gate: fk.gated_residual_rms_norm(residual, h, weight, gate, backend=backend),
        lambda residual, h, weight, gate: ref.gated_residual_rms_norm(residual, h, weight, gate),
        inputs,
        dtype,
    )


# ------------------------------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_through_custom_ops():
    """A block-like module over all three ops compiles with fullgraph=True (no graph break) and matches eager."""
    backend = "triton" if "triton" in fk.available_backends("rms_norm", DEVICE) else "reference"

    class Block(torch.nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.norm1 = fk.nn.RMSNorm(d, backend=backend)
            self.norm2 = fk.nn.ModulatedRMSNorm(d, backend=backend)
            self.norm3 = fk.nn.RMSNorm(d, backend=backend)
            for p in self.parameters():
                p.data.normal_(1.0, 0.2)

        def forward(self, x, scale, shift, gate, cu_seqlens):
            h = self.norm2(self.norm1(x), scale, shift, cu_seqlens)
            return fk.gated_residual_rms_norm(x, h, self.norm3.weight, gate, cu_seqlens=cu_seqlens, backend=backend)

    torch._dynamo.reset()
    block = Block(72).to(DEVICE)
    cu = offsets_of([5, 1, 7])
    x = fresh((13, 72), torch.float32).requires_grad_()
    scale, shift, gate = (fresh((3, 72), torch.float32).requires_grad_() for _ in range(3))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, scale, shift, gate, cu)
    grads = torch.autograd.grad(out.square().sum(), [x, scale, *block.parameters()])
    out_e = block(x, scale, shift, gate, cu)
    grads_e = torch.autograd.grad(out_e.square().sum(), [x, scale, *block.parameters()])
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)
    if backend == "triton":  # the kernels, not the reference, ran inside the graph
        graph_ops = str(torch._dynamo.explain(block)(x, scale, shift, gate, cu).graphs[0].code)
        assert "rms_norm_triton" in graph_ops and "gated_residual_rms_norm_triton" in graph_ops


# ------------------------------------------------------------------------------------------------ bad input


def _bad_input_backends() -> list[str]:
    return ["triton"] if "triton" in fk.available_backends("rms_norm", DEVICE) else ["reference"]


@pytest.mark.parametrize("backend", _bad_input_backends())
def test_bad_inputs(backend):
    x = fresh((7, 72), torch.float32)
    w = fresh((72,), torch.float32)
    sc = fresh((2, 72), torch.float32)
    cu = offsets_of([3, 4])
    with pytest.raises(ValueError, match=r"weight must have shape \(72,\)"):
        fk.rms_norm(x, fresh((71,), torch.float32), backend=backend)
    with pytest.raises(ValueError, match="weight must be 1-D"):
        fk.rms_norm(x, fresh((1, 72), torch.float32), backend=backend)
    with pytest.raises(TypeError, match="weight must have dtype in"):
        fk.rms_norm(x, torch.ones(72, dtype=torch.int32, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match="x must have dtype in"):
        fk.rms_norm(torch.ones(7, 72, dtype=torch.int64, device=DEVICE), w, backend=backend)
    with pytest.raises(ValueError, match="non-empty last"):
        fk.rms_norm(fresh((7, 0), torch.float32), None, backend=backend)
    with pytest.raises(ValueError, match="eps must be"):
        fk.rms_norm(x, w, -1.0, backend=backend)
    # cu_seqlens problems (value checks run on CPU tensors; the GPU path skips the host sync)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype in"):
        fk.rms_norm_modulate(x, w, sc, cu_seqlens=cu.long(), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        fk.rms_norm_modulate(x, w, sc, cu_seqlens=cu[None], backend=backend)
    with pytest.raises(ValueError, match=r"must be packed \(T, D\)"):
        fk.rms_norm_modulate(x[None], w, sc, cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 72\)"):
        fk.rms_norm_modulate(x, w, fresh((3, 72), torch.float32), cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match=r"gate must have shape \(2, 72\)"):
        fk.gated_residual_rms_norm(x, x, w, fresh((1, 72), torch.float32), cu_seqlens=cu, backend=backend)
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal"):
            fk.rms_norm_modulate(x, w, sc, cu_seqlens=offsets_of([3, 3]), backend=backend)
        with pytest.raises(ValueError, match="must be non-decreasing"):
            bad = torch.tensor([0, 5, 3, 7], dtype=torch.int32)
            fk.rms_norm_modulate(x, w, fresh((3, 72), torch.float32), cu_seqlens=bad, backend=backend)
        with pytest.raises(ValueError, match="must start at 0"):
            fk.rms_norm_modulate(x, w, sc, cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32), backend=backend)
    # padded / broadcast layouts
    with pytest.raises(ValueError, match=r"scale must have shape \(3, 72\)"):
        fk.rms_norm_modulate(fresh((3, 5, 72), torch.float32), w, fresh((2, 72), torch.float32), backend=backend)
    with pytest.raises(ValueError, match="does not broadcast"):
        fk.rms_norm_modulate(x, w, fresh((3, 72), torch.float32), backend=backend)
    with pytest.raises(ValueError, match="does not broadcast"):
        fk.rms_norm_modulate(x, w, sc, fresh((70,), torch.float32), backend=backend)
    with pytest.raises(ValueError, match=r"residual must have shape \(7, 72\)"):
        fk.gated_residual_rms_norm(x[:6], x, w, w, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.rms_norm(x, w, backend="nope")


def test_cuda_backend_unavailable_says_why():
    if "cuda" in fk.available_backends("rms_norm", DEVICE):
        pytest.skip("the cuda backend runs here")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run here"):
        fk.rms_norm(fresh((3, 72), torch.float32), None, backend="cuda")


def test_default_backend_on_cuda_prefers_fused_triton():
    """The declared default order on CUDA tensors (pending GPU measurement, see ops/norms.py)."""
    assert _dispatch._OPS["rms_norm"].order["cuda"][0] == "triton"
    assert _dispatch._OPS["rms_norm_modulate"].order["cuda"][0] == "triton"
    assert _dispatch._OPS["gated_residual_rms_norm"].order["cuda"][0] == "triton"


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d", [32, 4096, 4095, 16384])
def test_gpu_wide_rows(backend, d):
    if backend not in fk.available_backends("rms_norm", DEVICE):
        pytest.skip(f"{backend} is not available")
    inputs = make_inputs({"x": (257, d), "weight": (d,)}, torch.bfloat16)
    compare_with_reference(
        lambda x, weight: fk.rms_norm(x, weight, backend=backend),
        lambda x, weight: ref.rms_norm(x, weight),
        inputs,
        torch.bfloat16,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_gpu_packed_many_sequences():
    """Many samples and rows: the segment reduction across hundreds of backward programs."""
    if "triton" not in fk.available_backends("rms_norm_modulate", DEVICE):
        pytest.skip("triton is not available")
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 300, (40,), generator=gen).tolist()
    cu = offsets_of(lengths)
    t, d = sum(lengths), 2304
    inputs = make_inputs({"x": (t, d), "weight": (d,), "scale": (40, d), "shift": (40, d)}, torch.bfloat16)
    compare_with_reference(
        lambda x, weight, scale, shift: fk.rms_norm_modulate(x, weight, scale, shift, cu_seqlens=cu, backend="triton"),
        lambda x, weight, scale, shift: ref.rms_norm_modulate(x, weight, scale, shift, cu_seqlens=cu),
        inputs,
        torch.bfloat16,
    )


def test_cpu_backend_traces_under_compile():
    """The C++ CPU op has fake and autograd registrations: torch.compile(fullgraph=True) goes through it."""
    if "cpu" not in fk.available_backends("rms_norm", "cpu"):
        pytest.skip("the compiled extension is not built")
    x = fresh((5, 72), torch.float32, device="cpu").requires_grad_()
    w = fresh((72,), torch.float32, device="cpu").requires_grad_()
    compiled = torch.compile(lambda x, w: fk.rms_norm(x, w, backend="cpu"), fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    out.sum().backward()
    want = ref.rms_norm(x.detach().double(), w.detach().double())
    assert (out.double() - want).norm() / want.norm() < 1e-5
    assert x.grad is not None and w.grad is not None


# ------------------------------------------------------------------------------------------- bad offsets


@pytest.mark.parametrize("op", ["rms_norm_modulate", "gated_residual_rms_norm"])
@pytest.mark.parametrize("backend", backend_params("rms_norm_modulate"))
def test_strided_cu_seqlens(op, backend):
    """A cu_seqlens view with stride 2 (a column of a larger tensor) is read as the offsets it holds."""
    cu = offsets_of([3, 7, 1, 0, 5])
    strided = torch.stack([cu, 0 * cu], -1)[:, 0]
    assert strided.stride(0) == 2 and torch.equal(strided, cu)
    dtype = torch.float32
    inputs = make_inputs({"x": (16, 72), "weight": (72,), "p": (5, 72), "res": (16, 72)}, dtype, cu_seqlens=strided)
    if op == "rms_norm_modulate":
        fn = lambda x, weight, p, res, cu_seqlens, **kw: fk.rms_norm_modulate(x, weight, p, p, 1e-5, cu_seqlens, **kw)
        want = lambda x, weight, p, res, cu_seqlens: ref.rms_norm_modulate(x, weight, p, p, 1e-5, cu)
    else:
        fn = lambda x, weight, p, res, cu_seqlens, **kw: fk.gated_residual_rms_norm(
            res, x, weight, p, 1e-5, True, cu_seqlens, **kw
        )
        want = lambda x, weight, p, res, cu_seqlens: ref.gated_residual_rms_norm(res, x, weight, p, 1e-5, True, cu)
    compare_with_reference(lambda **kw: fn(**kw, backend=backend), want, inputs, dtype)


@pytest.mark.parametrize("op", ["rms_norm_modulate", "gated_residual_rms_norm"])
@pytest.mark.parametrize(
    "bad",
    [[0, 9, 3, 16], [0, 40, 50, 60], [-5, 2, 2, 16], [0, 0, 0, 0], [7, 7, 7, 7]],
    ids=["decreasing", "past_end", "negative", "all_zero", "short"],
)
def test_bad_offsets_stay_in_bounds(op, bad):
    """Offsets that contradict the rows (what unchecked GPU calls may pass): the kernels stay inside their
    tensors and every output element, gradients included, is written (poisoned allocations stay NaN-free)."""
    if "triton" not in fk.available_backends(op, DEVICE):
        pytest.skip("triton cannot run here")
    from flagdit_kernels.triton import norms as kernels

    cu = torch.tensor(bad, dtype=torch.int32, device=DEVICE)
    x, dy, res = (fresh((16, 72), torch.float32) for _ in range(3))
    w, p = fresh((72,), torch.float32), fresh((3, 72), torch.float32)
    if op == "rms_norm_modulate":
        kw = dict(mode=kernels.MODE_MODULATE, p1=p, p2=p, cu_seqlens=cu)
    else:
        kw = dict(mode=kernels.MODE_GATED, p1=p, cu_seqlens=cu)
    with poisoned_allocations():
        y, rstd = kernels.forward(x, w, 1e-5, residual=res, **kw)
        grads = kernels.backward(dy, x, w, rstd, **kw)
    for t in (y, rstd, *(g for g in grads if g is not None)):
        assert torch.isfinite(t).all()
