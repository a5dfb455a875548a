"""``fk.layer_norm_modulate`` (LayerNorm + adaLN modulation): the reference against LayerNorm written out in
float64, every backend against the float64 reference (forward and the gradients of x, scale, shift, weight and
bias), torch.compile through the custom ops, bad inputs, and ``fk.nn.ModulatedLayerNorm``.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1; without it they skip with the reason.
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import (
    DEVICE,
    KERNEL_DTYPES,
    assert_rel_close,
    backend_params,
    compare_with_reference,
    fresh,
    make_inputs,
    offsets_of,
)

import flagdit_kernels as fk
from flagdit_kernels import reference as ref

OP = "layer_norm_modulate"


def test_reference_is_layer_norm_then_modulation():
    """The spec against the math written out in float64: per-sample scale/shift of packed samples."""
    x = fresh((11, 37), torch.float64, scale=3.0, offset=2.0)
    scale, shift = fresh((3, 37), torch.float64), fresh((3, 37), torch.float64)
    weight, bias = fresh((37,), torch.float64), fresh((37,), torch.float64)
    lengths = [4, 0, 7]
    sample = torch.repeat_interleave(torch.arange(3, device=DEVICE), torch.tensor(lengths, device=DEVICE))
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-6) * weight + bias
    want = normed * (1 + scale[sample]) + shift[sample]
    got = ref.layer_norm_modulate(x, scale, shift, weight, bias, 1e-6, offsets_of(lengths))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# name -> (x shape, scale/shift shape, packed lengths or None)
LAYOUTS = {
    "padded_odd_d": ((3, 7, 37), (3, 37), None),
    "packed": ((37, 72), (5, 72), [1, 1, 13, 0, 22]),  # length-1 and empty samples, crossings of programs
    "packed_wide": ((5, 1000), (2, 1000), [3, 2]),
    "vector": ((9, 40), (40,), None),  # one (D,) scale for every row
    "per_row": ((2, 5, 24), (2, 5, 24), None),  # same shape as x: per-row gradient path
}


@pytest.mark.parametrize("backend", backend_params(OP))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("affine", [False, True], ids=["no_affine", "affine"])
def test_against_float64_reference(backend, dtype, layout, affine):
    x_shape, p_shape, lengths = LAYOUTS[layout]
    d = x_shape[-1]
    with_shift = layout != "vector"  # and one layout without shift
    inputs = make_inputs(
        {
            "x": x_shape,
            "scale": p_shape,
            "shift": p_shape if with_shift else None,
            "weight": (d,) if affine else None,
            "bias": (d,) if affine else None,
        },
        dtype,
        cu_seqlens=offsets_of(lengths) if lengths is not None else None,
    )
    inputs["x"] = inputs["x"] * 2 + 0.5  # a non-zero mean: the centring matters

    def call(x, scale, shift, weight, bias, cu_seqlens):
        return fk.layer_norm_modulate(x, scale, shift, weight, bias, 1e-6, cu_seqlens, backend=backend)

    compare_with_reference(call, ref.layer_norm_modulate, inputs, dtype)


@pytest.mark.parametrize("backend", backend_params(OP))
def test_packed_many_samples(backend):
    """Many short samples (more samples than rows per program, empty ones among them) in one packed batch."""
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 4, (150,), generator=gen).tolist()
    d = 24
    inputs = make_inputs(
        {"x": (sum(lengths), d), "scale": (150, d), "shift": (150, d), "weight": (d,), "bias": (d,)},
        torch.float32,
        cu_seqlens=offsets_of(lengths),
    )
    compare_with_reference(
        lambda x, scale, shift, weight, bias, cu_seqlens: fk.layer_norm_modulate(
            x, scale, shift, weight, bias, cu_seqlens=cu_seqlens, backend=backend
        ),
        ref.layer_norm_modulate,
        inputs,
        torch.float32,
    )


@pytest.mark.parametrize("backend", backend_params(OP))
def test_strided_rows(backend):
    """Rows with a stride larger than D (a column slice of a fused projection) are read as they are."""
    buf = fresh((13, 3 * 40), torch.float32)
    scale = fresh((40,), torch.float32)
    compare_with_reference(
        lambda buf, scale: fk.layer_norm_modulate(buf[:, 40:80], scale, backend=backend),
        lambda buf, scale: ref.layer_norm_modulate(buf[:, 40:80], scale),
        {"buf": buf, "scale": scale},
        torch.float32,
    )


def test_module_matches_layer_norm_then_modulation():
    """``fk.nn.ModulatedLayerNorm`` is ``nn.LayerNorm`` then ``* (1 + scale) + shift``, with its parameter names."""
    d = 40
    mod = fk.nn.ModulatedLayerNorm(d, elementwise_affine=True).to(DEVICE)
    torch.nn.init.normal_(mod.weight)
    torch.nn.init.normal_(mod.bias)
    eager = torch.nn.LayerNorm(d, eps=1e-6).to(DEVICE)
    eager.load_state_dict(mod.state_dict())
    x, scale, shift = fresh((2, 5, d), torch.float32), fresh((2, d), torch.float32), fresh((2, d), torch.float32)
    assert_rel_close(mod(x, scale, shift), eager(x) * (1 + scale[:, None]) + shift[:, None], 1e-6)
    assert [n for n, _ in fk.nn.ModulatedLayerNorm(d).named_parameters()] == []


def test_compile_fullgraph_through_custom_ops():
    """torch.compile(fullgraph=True) traces through the op (no graph break) and matches eager, gradients too."""
    backend = "triton" if "triton" in fk.available_backends(OP, DEVICE) else "reference"
    mod = fk.nn.ModulatedLayerNorm(40, elementwise_affine=True, backend=backend).to(DEVICE)
    cu = offsets_of([5, 1, 7])
    x = fresh((13, 40), torch.float32).requires_grad_()
    scale, shift = (fresh((3, 40), torch.float32).requires_grad_() for _ in range(2))
    torch._dynamo.reset()
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out = compiled(x, scale, shift, cu)
    grads = torch.autograd.grad(out.square().sum(), [x, scale, shift, *mod.parameters()])
    out_e = mod(x, scale, shift, cu)
    grads_e = torch.autograd.grad(out_e.square().sum(), [x, scale, shift, *mod.parameters()])
    torch.testing.assert_close(out, out_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)
    if backend == "triton":  # the kernel, not the reference, ran inside the graph
        graph = str(torch._dynamo.explain(mod)(x, scale, shift, cu).graphs[0].code)
        assert "layer_norm_modulate_triton" in graph


def test_custom_op_opcheck():
    if "triton" not in fk.available_backends(OP, DEVICE):
        pytest.skip("triton cannot run here")
    x, scale, shift, w, b = (
        fresh((9, 24), torch.float32),
        *(fresh(s, torch.float32) for s in [(2, 24)] * 2 + [(24,)] * 2),
    )
    args = (x.requires_grad_(), scale.requires_grad_(), shift, w, b, 1e-6, offsets_of([4, 5]))
    torch.library.opcheck(
        torch.ops.flagdit_kernels.layer_norm_modulate_triton.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


def test_bad_inputs():
    x, sc, w = fresh((7, 40), torch.float32), fresh((2, 40), torch.float32), fresh((40,), torch.float32)
    cu = offsets_of([3, 4])
    with pytest.raises(ValueError, match=r"weight must have shape \(40,\)"):
        fk.layer_norm_modulate(x, sc, weight=fresh((39,), torch.float32), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        fk.layer_norm_modulate(x, sc, weight=w, bias=fresh((41,), torch.float32), cu_seqlens=cu)
    with pytest.raises(TypeError, match=r"bias must be a torch\.Tensor"):
        fk.layer_norm_modulate(x, sc, bias=[0.0] * 40, cu_seqlens=cu)
    with pytest.raises(TypeError, match="x must have dtype in"):
        fk.layer_norm_modulate(torch.ones(7, 40, dtype=torch.int64, device=DEVICE), sc, cu_seqlens=cu)
    with pytest.raises(ValueError, match="non-empty last"):
        fk.layer_norm_modulate(fresh((7, 0), torch.float32), fresh((2, 0), torch.float32), cu_seqlens=cu)
    with pytest.raises(ValueError, match="eps must be"):
        fk.layer_norm_modulate(x, sc, eps=-1.0, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 40\)"):
        fk.layer_norm_modulate(x, fresh((3, 40), torch.float32), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 40\)"):
        fk.layer_norm_modulate(x, sc, fresh((1, 40), torch.float32), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"must be packed \(T, D\)"):
        fk.layer_norm_modulate(x[None], sc, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"scale must have shape \(3, 40\)"):
        fk.layer_norm_modulate(fresh((3, 5, 40), torch.float32), sc)
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.layer_norm_modulate(x, sc, cu_seqlens=cu, backend="nope")
    # The fusion is Triton's: no C++ backend, and the dispatcher says which ones the op has.
    with pytest.raises(ValueError, match=r"no 'cuda' implementation \(has \['reference', 'triton'\]\)"):
        fk.layer_norm_modulate(x, sc, cu_seqlens=cu, backend="cuda")
