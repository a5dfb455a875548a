"""Public norm family: ``rms_norm``, ``rms_norm_modulate``, ``gated_residual_rms_norm``, ``layer_norm_modulate``.

Backends: ``reference`` (PyTorch), ``triton`` (``flagdit_kernels/triton/norms.py``; all four ops) and
``cuda`` (``csrc/rms_norm_cuda.cu``; ``rms_norm`` only, when the extension was built with CUDA) and ``cpu``
(``csrc/rms_norm_cpu.cpp``; ``rms_norm`` only, the default for CPU tensors when the extension is built): the
two kernels of one C++ op, ``flagdit_kernels::rms_norm_fwd`` / ``_bwd``, under its CPU and CUDA dispatch keys.
The Triton kernels are wrapped as ``torch.library`` custom ops (``flagdit_kernels::rms_norm_triton`` and
friends, each with a fake impl and an autograd formula whose backward is again a custom op) so that
``torch.compile(fullgraph=True)`` traces through them without graph breaks.
"""

from __future__ import annotations

import torch

from .. import _dispatch
from .. import reference as ref
from .._extension import extension_missing
from .._layout import VarlenLayout, check_layout
from .._validation import check_cu_seqlens, check_number, check_per_sample, check_shape, check_tensor
from ..reference.norms import EPS, LAYER_NORM_EPS

__all__ = ["gated_residual_rms_norm", "layer_norm_modulate", "rms_norm", "rms_norm_modulate"]

for _op, _fn in (
    ("rms_norm", ref.rms_norm),
    ("rms_norm_modulate", ref.rms_norm_modulate),
    ("gated_residual_rms_norm", ref.gated_residual_rms_norm),
    ("layer_norm_modulate", ref.layer_norm_modulate),
):
    _dispatch.register(_op, "reference", _fn, devices=("cpu", "cuda"))


def _check_norm_inputs(x_name: str, x: object, weight: object, eps: float) -> torch.Tensor:
    check_tensor(x_name, x, min_ndim=1)
    assert isinstance(x, torch.Tensor)
    if x.shape[-1] == 0:
        raise ValueError(f"{x_name} must have a non-empty last (feature) dimension, got {tuple(x.shape)}")
    if weight is not None:
        check_tensor("weight", weight, ndim=1, device=x.device)
        check_shape("weight", weight, (x.shape[-1],))
    check_number("eps", eps)
    return x


def _check_packed(
    x_name: str, x: torch.Tensor, cu_seqlens: torch.Tensor | VarlenLayout | None
) -> tuple[torch.Tensor | None, int | None]:
    """(offsets, number of sequences) of a packed x, or Nones when padded. Every backend finds a token's sample
    from the offsets (a layout's ``sample_index`` is not read: see ``flagdit_kernels/_layout.py``)."""
    if cu_seqlens is None:
        return None, None
    if x.dim() != 2:
        raise ValueError(f"{x_name} must be packed (T, D) when cu_seqlens is given, got {tuple(x.shape)}")
    if isinstance(cu_seqlens, VarlenLayout):
        check_layout("cu_seqlens", cu_seqlens, x.shape[0], f"{x_name}.shape[0]", x.device)
        return cu_seqlens.cu_seqlens, cu_seqlens.num_seqs
    # On the GPU the kernels never read outside the (B, D) parameters whatever the offsets hold (sample
    # indices are clamped), so the host-side value checks are skipped there unless asked for.
    check_cu_seqlens("cu_seqlens", cu_seqlens, x.shape[0], x.device, total_name=f"{x_name}.shape[0]")
    return cu_seqlens, cu_seqlens.numel() - 1


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = EPS,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim: ``round(x * rsqrt(mean(x^2) + eps)) * weight`` (fp32 math, Lumina rounding).

    ``x`` is ``(..., D)``; ``weight`` ``(D,)`` or None for no affine (any float dtype: fp32 weights with bf16
    activations are fine). The Triton and CUDA kernels read strided leading dims in place (a row slice of a
    larger buffer, a transposed batch) and need a unit-stride last dim (otherwise they copy x once).
    ``backend`` / ``prefer``: see ``flagdit_kernels._dispatch`` (a named backend, a module's preference).
    """
    _check_norm_inputs("x", x, weight, eps)
    return _dispatch.resolve("rms_norm", x, backend, prefer).fn(x, weight, eps)


def rms_norm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    eps: float = EPS,
    cu_seqlens: torch.Tensor | VarlenLayout | None = None,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """``rms_norm(x, weight) * (1 + scale) + shift`` with per-sample scale/shift.

    Layouts: padded ``x (B, L, D)`` with ``scale (B, D)``; packed ``x (T, D)`` with ``scale (B, D)`` and
    ``cu_seqlens`` int32 ``(B+1,)`` or a :class:`~flagdit_kernels.VarlenLayout` (the kernels find each token's
    sample on the device); or any ``scale`` that broadcasts to ``x``. In the Triton kernels, parameters that
    are constant along L (``(B, D)``, ``(B, 1, D)``, ``(D,)``) get their gradients from in-kernel per-sample
    partial sums; parameters that vary along L (e.g. the same shape as x) get a per-row fp32 gradient reduced
    by ``Tensor.sum_to_size``, and broadcast patterns that a ``(B, L)`` row view cannot express are
    materialized to x's shape first. Values of raw ``cu_seqlens`` are checked on CPU tensors only (no host
    sync on the GPU path); a layout was checked when it was built.
    """
    _check_norm_inputs("x", x, weight, eps)
    cu, num_seqs = _check_packed("x", x, cu_seqlens)
    check_per_sample("scale", scale, x, num_seqs)
    if shift is not None:
        check_per_sample("shift", shift, x, num_seqs)
    fn = _dispatch.resolve("rms_norm_modulate", x, backend, prefer).fn
    return fn(x, weight, scale, shift, eps, cu)


def gated_residual_rms_norm(
    residual: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    gate: torch.Tensor,
    eps: float = EPS,
    tanh_gate: bool = True,
    cu_seqlens: torch.Tensor | VarlenLayout | None = None,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """``residual + act(gate) * rms_norm(h, weight)``, act = tanh (``tanh_gate``) or identity.

    The Next-DiT sandwich norm. ``gate`` is per sample like ``scale`` in :func:`rms_norm_modulate`.
    """
    _check_norm_inputs("h", h, weight, eps)
    check_tensor("residual", residual, device=h.device)
    check_shape("residual", residual, h.shape)
    cu, num_seqs = _check_packed("h", h, cu_seqlens)
    check_per_sample("gate", gate, h, num_seqs)
    fn = _dispatch.resolve("gated_residual_rms_norm", h, backend, prefer).fn
    return fn(residual, h, weight, gate, eps, tanh_gate, cu)


def layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = LAYER_NORM_EPS,
    cu_seqlens: torch.Tensor | VarlenLayout | None = None,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(x) [* weight + bias] * (1 + scale) + shift`` with per-sample scale/shift, one fused pass.

    The adaLN-LayerNorm of DiT final layers (Flag-DiT's ``LayerNorm(elementwise_affine=False)`` then
    ``x * (1 + scale) + shift``; Flux, SD3, Wan, HunyuanVideo) and of their blocks. LayerNorm in fp32, its
    output rounded to x's dtype (as an ``nn.LayerNorm`` module returns it), then the modulation in fp32,
    rounded once. ``weight`` / ``bias`` ``(D,)`` are the optional LayerNorm affine. Layouts as in
    :func:`rms_norm_modulate`: padded ``x (B, L, D)`` with ``scale (B, D)``; packed ``x (T, D)`` with
    ``scale (B, D)`` and ``cu_seqlens``; or any ``scale`` / ``shift`` that broadcasts to ``x``.
    """
    _check_norm_inputs("x", x, weight, eps)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        check_shape("bias", bias, (x.shape[-1],))
    cu, num_seqs = _check_packed("x", x, cu_seqlens)
    check_per_sample("scale", scale, x, num_seqs)
    if shift is not None:
        check_per_sample("shift", shift, x, num_seqs)
    fn = _dispatch.resolve("layer_norm_modulate", x, backend, prefer).fn
    return fn(x, scale, shift, weight, bias, eps, cu)


# ----------------------------------------------------------------------------------------------------------
# Triton backend: custom ops over flagdit_kernels/triton/norms.py.
# Forward ops return (y, rstd); rstd (fp32, one per row) is saved for the backward and not differentiable.
# Backward ops return an empty (0,) tensor for a gradient whose input is None (custom ops return tensors).

Tensor = torch.Tensor
_NONE = (0,)


def _kernels():
    from ..triton import norms as kernels  # imported on first use: Triton is optional

    return kernels


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_NONE) if t is None else t


def _fake_fwd(x: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    rows = x.numel() // x.shape[-1]
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty((rows,), dtype=torch.float32)


def _fake_grad(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(_NONE) if t is None else t.new_empty(t.shape)


@torch.library.custom_op("flagdit_kernels::rms_norm_triton", mutates_args=())
def _rms_norm_triton_op(x: Tensor, weight: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    return _kernels().forward(x, weight, eps)


@_rms_norm_triton_op.register_fake
def _(x, weight, eps):
    return _fake_fwd(x, x.dtype)


@torch.library.custom_op("flagdit_kernels::rms_norm_triton_bwd", mutates_args=())
def _rms_norm_triton_bwd_op(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor) -> tuple[Tensor, Tensor]:
    dx, dw, *_ = _kernels().backward(dy, x, weight, rstd)
    return dx, _or_empty(dw, x)


@_rms_norm_triton_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), _fake_grad(weight, x)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.has_weight = weight is not None
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(backward_op):
    """rms_norm's autograd formula around ``backward_op`` (the Triton one or the C++ one): ``(dx, dweight)``."""

    def backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = backward_op(dy, x, weight if ctx.has_weight else None, rstd)
        return dx, (dw if ctx.has_weight else None), None

    return backward


_rms_norm_triton_op.register_autograd(
    _rms_norm_backward(torch.ops.flagdit_kernels.rms_norm_triton_bwd), setup_context=_rms_norm_setup
)


@torch.library.custom_op("flagdit_kernels::rms_norm_modulate_triton", mutates_args=())
def _modulate_triton_op(
    x: Tensor, weight: Tensor | None, scale: Tensor, shift: Tensor | None, eps: float, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    k = _kernels()
    return k.forward(x, weight, eps, mode=k.MODE_MODULATE, p1=scale, p2=shift, cu_seqlens=cu_seqlens)


@_modulate_triton_op.register_fake
def _(x, weight, scale, shift, eps, cu_seqlens):
    return _fake_fwd(x, x.dtype)


@torch.library.custom_op("flagdit_kernels::rms_norm_modulate_triton_bwd", mutates_args=())
def _modulate_triton_bwd_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    shift: Tensor | None,
    rstd: Tensor,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    k = _kernels()
    dx, dw, dscale, dshift, _ = k.backward(
        dy, x, weight, rstd, mode=k.MODE_MODULATE, p1=scale, p2=shift, cu_seqlens=cu_seqlens
    )
    return dx, _or_empty(dw, x), dscale, _or_empty(dshift, x)


@_modulate_triton_bwd_op.register_fake
def _(dy, x, weight, scale, shift, rstd, cu_seqlens):
    return x.new_empty(x.shape), _fake_grad(weight, x), scale.new_empty(scale.shape), _fake_grad(shift, x)


def _modulate_setup(ctx, inputs, output):
    x, weight, scale, shift, _, cu_seqlens = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.has_weight, ctx.has_shift, ctx.packed = weight is not None, shift is not None, cu_seqlens is not None
    ctx.save_for_backward(x, weight, scale, shift, output[1], cu_seqlens)


def _modulate_backward(ctx, dy, _drstd):
    x, weight, scale, shift, rstd, cu_seqlens = ctx.saved_tensors
    dx, dw, dscale, dshift = torch.ops.flagdit_kernels.rms_norm_modulate_triton_bwd(
        dy,
        x,
        weight if ctx.has_weight else None,
        scale,
        shift if ctx.has_shift else None,
        rstd,
        cu_seqlens if ctx.packed else None,
    )
    return dx, (dw if ctx.has_weight else None), dscale, (dshift if ctx.has_shift else None), None, None


_modulate_triton_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


@torch.library.custom_op("flagdit_kernels::gated_residual_rms_norm_triton", mutates_args=())
def _gated_triton_op(
    residual: Tensor,
    h: Tensor,
    weight: Tensor | None,
    gate: Tensor,
    eps: float,
    tanh_gate: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor]:
    k = _kernels()
    return k.forward(
        h, weight, eps, mode=k.MODE_GATED, p1=gate, residual=residual, tanh_gate=tanh_gate, cu_seqlens=cu_seqlens
    )


@_gated_triton_op.register_fake
def _(residual, h, weight, gate, eps, tanh_gate, cu_seqlens):
    return _fake_fwd(h, residual.dtype)


@torch.library.custom_op("flagdit_kernels::gated_residual_rms_norm_triton_bwd", mutates_args=())
def _gated_triton_bwd_op(
    dy: Tensor,
    h: Tensor,
    weight: Tensor | None,
    gate: Tensor,
    rstd: Tensor,
    tanh_gate: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    k = _kernels()
    dh, dw, dgate, *_ = k.backward(
        dy, h, weight, rstd, mode=k.MODE_GATED, p1=gate, tanh_gate=tanh_gate, cu_seqlens=cu_seqlens
    )
    return dh, _or_empty(dw, h), dgate


@_gated_triton_bwd_op.register_fake
def _(dy, h, weight, gate, rstd, tanh_gate, cu_seqlens):
    return h.new_empty(h.shape), _fake_grad(weight, h), gate.new_empty(gate.shape)


def _gated_setup(ctx, inputs, output):
    _, h, weight, gate, _, ctx.tanh_gate, cu_seqlens = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.has_weight, ctx.packed = weight is not None, cu_seqlens is not None
    ctx.save_for_backward(h, weight, gate, output[1], cu_seqlens)


def _gated_backward(ctx, dy, _drstd):
    h, weight, gate, rstd, cu_seqlens = ctx.saved_tensors
    dh, dw, dgate = torch.ops.flagdit_kernels.gated_residual_rms_norm_triton_bwd(
        dy, h, weight if ctx.has_weight else None, gate, rstd, ctx.tanh_gate, cu_seqlens if ctx.packed else None
    )
    # d residual = dy (the output has the residual's dtype and shape).
    return dy, dh, (dw if ctx.has_weight else None), dgate, None, None, None


_gated_triton_op.register_autograd(_gated_backward, setup_context=_gated_setup)


@torch.library.custom_op("flagdit_kernels::layer_norm_modulate_triton", mutates_args=())
def _layer_modulate_triton_op(
    x: Tensor,
    scale: Tensor,
    shift: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor]:
    k = _kernels()
    return k.forward(
        x, weight, eps, norm=k.NORM_LAYER, bias=bias, mode=k.MODE_MODULATE, p1=scale, p2=shift, cu_seqlens=cu_seqlens
    )


@_layer_modulate_triton_op.register_fake
def _(x, scale, shift, weight, bias, eps, cu_seqlens):
    return _fake_fwd(x, x.dtype)


@torch.library.custom_op("flagdit_kernels::layer_norm_modulate_triton_bwd", mutates_args=())
def _layer_modulate_triton_bwd_op(
    dy: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    rstd: Tensor,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    k = _kernels()
    dx, dw, dscale, dshift, db = k.backward(
        dy, x, weight, rstd, norm=k.NORM_LAYER, bias=bias, mode=k.MODE_MODULATE, p1=scale, p2=shift,
        cu_seqlens=cu_seqlens,
    )  # fmt: skip
    return dx, dscale, _or_empty(dshift, x), _or_empty(dw, x), _or_empty(db, x)


@_layer_modulate_triton_bwd_op.register_fake
def _(dy, x, scale, shift, weight, bias, rstd, cu_seqlens):
    grads = (_fake_grad(shift, x), _fake_grad(weight, x), _fake_grad(bias, x))
    return x.new_empty(x.shape), scale.new_empty(scale.shape), *grads


def _layer_modulate_setup(ctx, inputs, output):
    x, scale, shift, weight, bias, _, cu_seqlens = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.given = tuple(t is not None for t in (shift, weight, bias, cu_seqlens))
    ctx.save_for_backward(x, scale, shift, weight, bias, output[1], cu_seqlens)


def _layer_modulate_backward(ctx, dy, _drstd):
    x, scale, shift, weight, bias, rstd, cu_seqlens = ctx.saved_tensors
    shift, weight, bias, cu_seqlens = (t if g else None for t, g in zip((shift, weight, bias, cu_seqlens), ctx.given))
    dx, dscale, dshift, dw, db = torch.ops.flagdit_kernels.layer_norm_modulate_triton_bwd(
        dy, x, scale, shift, weight, bias, rstd, cu_seqlens
    )
    has_shift, has_weight, has_bias, _ = ctx.given
    return (
        dx, dscale, dshift if has_shift else None, dw if has_weight else None, db if has_bias else None, None, None,
    )  # fmt: skip


_layer_modulate_triton_op.register_autograd(_layer_modulate_backward, setup_context=_layer_modulate_setup)


def _rms_norm_triton(x, weight, eps):
    return torch.ops.flagdit_kernels.rms_norm_triton(x, weight, float(eps))[0]


def _rms_norm_modulate_triton(x, weight, scale, shift, eps, cu_seqlens):
    return torch.ops.flagdit_kernels.rms_norm_modulate_triton(x, weight, scale, shift, float(eps), cu_seqlens)[0]


def _gated_residual_rms_norm_triton(residual, h, weight, gate, eps, tanh_gate, cu_seqlens):
    return torch.ops.flagdit_kernels.gated_residual_rms_norm_triton(
        residual, h, weight, gate, float(eps), bool(tanh_gate), cu_seqlens
    )[0]


def _layer_norm_modulate_triton(x, scale, shift, weight, bias, eps, cu_seqlens):
    op = torch.ops.flagdit_kernels.layer_norm_modulate_triton
    return op(x, scale, shift, weight, bias, float(eps), cu_seqlens)[0]


for _op, _fn in (
    ("rms_norm", _rms_norm_triton),
    ("rms_norm_modulate", _rms_norm_modulate_triton),
    ("gated_residual_rms_norm", _gated_residual_rms_norm_triton),
    ("layer_norm_modulate", _layer_norm_modulate_triton),
):
    _dispatch.register(_op, "triton", _fn, dtypes=_dispatch.FP32_MATH_DTYPES, **_dispatch.TRITON)


# ----------------------------------------------------------------------------------------------------------
# Compiled C++ backends, rms_norm only (the modulated and gated ops, and layer_norm_modulate, have none: their
# fusions are Triton's): one op pair, flagdit_kernels::rms_norm_fwd / rms_norm_bwd (csrc/bindings.cpp), with a
# CPU kernel (csrc/rms_norm_cpu.cpp) and, in a CUDA build, a CUDA kernel (csrc/rms_norm_cuda.cu) under the
# dispatch keys; registered as the "cpu" and "cuda" backends. Both return (y, rstd) and share one fake and
# one autograd formula.


def _register_compiled_autograd() -> None:
    lib = torch.library

    @lib.register_fake("flagdit_kernels::rms_norm_fwd")
    def _(x, weight, eps):
        return _fake_fwd(x, x.dtype)

    @lib.register_fake("flagdit_kernels::rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return x.new_empty(x.shape), _fake_grad(weight, x)

    backward = _rms_norm_backward(torch.ops.flagdit_kernels.rms_norm_bwd)
    lib.register_autograd("flagdit_kernels::rms_norm_fwd", backward, setup_context=_rms_norm_setup)


def _rms_norm_compiled(x, weight, eps):
    return torch.ops.flagdit_kernels.rms_norm_fwd(x, weight, float(eps))[0]


def _compiled_missing(cuda: bool) -> str:
    """Why the C++ rms_norm cannot run ("" when it can): no extension, no CUDA in it, or an extension built
    before the op had its present name (its schemas then lack ``rms_norm_fwd``)."""
    missing = extension_missing(cuda=cuda)
    if not missing and not hasattr(torch.ops.flagdit_kernels, "rms_norm_fwd"):
        missing = "the compiled extension predates rms_norm_fwd: rebuild it (python setup.py build_ext --inplace)"
    return missing


if not _compiled_missing(cuda=False):
    _register_compiled_autograd()
for _device in ("cuda", "cpu"):
    _missing = _compiled_missing(cuda=_device == "cuda")
    _dispatch.register(
        "rms_norm",
        _device,
        _rms_norm_compiled,
        devices=(_device,),
        dtypes=_dispatch.FP32_MATH_DTYPES if _device == "cuda" else None,  # the CPU kernels compute float64 in float64
        missing=lambda m=_missing: m,
    )

# Default order on CUDA tensors. Not measured yet (no GPU in the session that wrote these kernels): the fused
# Triton kernels go first because they read x once and fuse the modulation / gate; the CUDA C++ rms_norm is
# the alternative. Revisit with benchmarks/ (flagdit_kernels.bench.families.norms) on the GPU and reorder if needed.
_dispatch.set_preference("rms_norm", "cuda", ("triton", "cuda", "reference"))
_dispatch.set_preference("rms_norm_modulate", "cuda", ("triton", "reference"))
_dispatch.set_preference("gated_residual_rms_norm", "cuda", ("triton", "reference"))
_dispatch.set_preference("layer_norm_modulate", "cuda", ("triton", "reference"))
