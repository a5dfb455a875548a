"""Public rotary embedding ops: ``rope_freqs``, ``apply_rope``, ``qk_norm_rope``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _dispatch
from .. import reference as ref
from .._validation import check_int, check_number, check_same_dtype, check_shape, check_tensor, values_checked
from ..reference.rope import QK_NORM_EPS

__all__ = ["apply_rope", "qk_norm_rope", "rope_freqs"]

NORMS = ("layer_norm", "rms_norm", None)
MAX_HEAD_DIM = 256

_dispatch.register("rope_freqs", "reference", ref.rope_freqs, devices=("cpu", "cuda"))
_dispatch.register("apply_rope", "reference", ref.apply_rope, devices=("cpu", "cuda"))
_dispatch.register("qk_norm_rope", "reference", ref.qk_norm_rope, devices=("cpu", "cuda"))


def check_head_dim(name: str, head_dim: int) -> None:
    if head_dim % 2 or not 2 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim must be even and in [2, {MAX_HEAD_DIM}], got {head_dim}")


def rope_freqs(
    head_dim: int,
    positions: torch.Tensor,
    axes_dims: Sequence[int] | None = None,
    theta: float = 10000.0,
    linear_factor: float = 1.0,
    ntk_factor: float = 1.0,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """Rotary (cos, sin) table, float32 ``(T, head_dim // 2, 2)``, built on positions' device.

    ``positions`` ``(T,)`` gives 1D RoPE (Lumina-T2X). ``(T, n_axes)`` with ``axes_dims`` (even, summing to
    head_dim) splits the pairs into consecutive per-axis groups (Lumina-Image-2.0); ``(T, 2)`` without it
    alternates axes, pair k using axis k % 2 and frequency index k // 2 (Lumina-Next). ``ntk_factor``
    multiplies theta; ``linear_factor`` divides positions.
    """
    check_int("head_dim", head_dim, 1)
    check_head_dim("rope_freqs", head_dim)
    check_tensor("positions", positions, ndim=(1, 2), dtypes=None)
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer or float tensor, got {positions.dtype}")
    for name, value in (("theta", theta), ("linear_factor", linear_factor), ("ntk_factor", ntk_factor)):
        check_number(name, value, positive=True)
    if axes_dims is not None:
        axes_dims = tuple(int(d) for d in axes_dims)
        if positions.dim() != 2 or positions.shape[1] != len(axes_dims):
            raise ValueError(
                f"positions must be (T, {len(axes_dims)}) for axes_dims={axes_dims}, got {tuple(positions.shape)}"
            )
        if sum(axes_dims) != head_dim or any(d <= 0 or d % 2 for d in axes_dims):
            raise ValueError(f"axes_dims must be positive even sizes summing to head_dim={head_dim}, got {axes_dims}")
    elif positions.dim() == 2 and positions.shape[1] not in (1, 2):
        raise ValueError(
            f"positions of shape {tuple(positions.shape)} need axes_dims; without it positions must be "
            "(T,) for 1D or (T, 2) for 2D alternating axes"
        )
    elif positions.dim() == 2 and positions.shape[1] == 2 and head_dim % 4:
        raise ValueError(f"2D alternating RoPE needs head_dim divisible by 4, got {head_dim}")
    fn = _dispatch.resolve("rope_freqs", positions, backend, prefer).fn
    freqs = fn(head_dim, positions, axes_dims, theta, linear_factor, ntk_factor)
    # Finite factors can still overflow the fp32 angles (theta = 1e-100, or positions / linear_factor beyond
    # 3e38): cos and sin of inf are NaN. Checked where reading values is free, like the offsets.
    if values_checked(positions.device) and not bool(torch.isfinite(freqs).all()):
        raise ValueError(
            f"rope_freqs: the angles positions / linear_factor * (theta * ntk_factor) ** (-2i / head_dim) overflow "
            f"float32 (theta={theta!r}, linear_factor={linear_factor!r}, ntk_factor={ntk_factor!r})"
        )
    return freqs


def check_freqs(freqs: object, x_name: str, x: torch.Tensor) -> torch.Tensor:
    """freqs must be float32 (tokens..., Dh/2, 2) matching x's token layout."""
    check_tensor("freqs", freqs, ndim=(3, 4), dtypes=(torch.float32, torch.float64), device=x.device)
    assert isinstance(freqs, torch.Tensor)
    half = x.shape[-1] // 2
    if x.dim() == 3:
        check_shape("freqs", freqs, (x.shape[0], half, 2))
    elif freqs.dim() == 3:
        check_shape("freqs", freqs, (x.shape[1], half, 2))
    else:
        check_shape("freqs", freqs, (x.shape[0], x.shape[1], half, 2))
    return freqs


def _check_heads(name: str, x: object, device: torch.device | None = None) -> torch.Tensor:
    check_tensor(name, x, ndim=(3, 4), device=device)
    assert isinstance(x, torch.Tensor)
    check_head_dim(name, x.shape[-1])
    return x


def apply_rope(
    x: torch.Tensor,
    freqs: torch.Tensor,
    interleaved: bool = True,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """Rotates x ``(T, H, Dh)`` or ``(B, L, H, Dh)`` by ``freqs`` (from :func:`rope_freqs`; for 4-D x either
    ``(L, Dh/2, 2)`` shared by the batch or ``(B, L, Dh/2, 2)``). ``interleaved`` rotates pairs (2i, 2i+1)
    (Lumina's complex multiply), else halves (i, i + Dh/2) (Llama/HF). fp32 math, output in x's dtype.
    x may be any strided view (e.g. sliced from a fused QKV projection): the Triton backend reads it in place,
    with no unit-stride requirement; its output is contiguous. freqs gets no gradient.
    """
    _check_heads("x", x)
    check_freqs(freqs, "x", x)
    return _dispatch.resolve("apply_rope", x, backend, prefer).fn(x, freqs, interleaved)


def _norm_params(name: str, norm_arg, norm: str | None, width: int, device: torch.device):
    """(weight, bias, eps or None) from a (weight, bias) tuple, a norm module, or None."""
    if norm_arg is None:
        return None, None, None
    if isinstance(norm_arg, torch.nn.Module):
        weight, bias = getattr(norm_arg, "weight", None), getattr(norm_arg, "bias", None)
        eps = getattr(norm_arg, "eps", None)
        eps = eps if isinstance(eps, (int, float)) else None
    elif isinstance(norm_arg, (tuple, list)) and len(norm_arg) == 2:
        (weight, bias), eps = norm_arg, None
    else:
        raise TypeError(f"{name} must be a (weight, bias) tuple, a norm module or None, got {type(norm_arg).__name__}")
    for part, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(f"{name} {part}", t, ndim=1, device=device)
            check_shape(f"{name} {part}", t, (width,))
    if norm is None and (weight is not None or bias is not None):
        raise ValueError(f"{name} has parameters but norm=None")
    return weight, bias, eps


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    freqs: torch.Tensor,
    q_norm=None,
    k_norm=None,
    norm: str | None = "layer_norm",
    eps: float = QK_NORM_EPS,
    interleaved: bool = True,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK-norm then RoPE, fused: returns ``(q_out, k_out)`` in q's dtype (fp32 math).

    ``norm="layer_norm"`` normalizes across all heads (LayerNorm over H*Dh, Flag-DiT / Lumina-Next; params
    ``(H*Dh,)``), ``"rms_norm"`` per head (Lumina-Image-2.0; params ``(Dh,)``), ``None`` skips it. ``q_norm``
    / ``k_norm`` are ``(weight, bias)`` tuples (either may be None) or modules (their ``eps`` wins).
    k may have fewer heads than q (GQA). q/k may be strided views of a fused QKV projection.
    """
    _check_heads("q", q)
    _check_heads("k", k, device=q.device)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if k.dim() != q.dim() or k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must match q in every dim but heads: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of k heads ({k.shape[-2]})")
    check_same_dtype("k", k, "q", q)
    check_freqs(freqs, "q", q)
    per_head = norm == "rms_norm"
    qw, qb, q_eps = _norm_params(
        "q_norm", q_norm, norm, q.shape[-1] if per_head else q.shape[-2] * q.shape[-1], q.device
    )
    kw, kb, k_eps = _norm_params(
        "k_norm", k_norm, norm, k.shape[-1] if per_head else k.shape[-2] * k.shape[-1], q.device
    )
    eps = check_number("eps", eps) if q_eps is None else check_number("q_norm.eps", q_eps)
    if k_eps is not None and check_number("k_norm.eps", k_eps) != eps:
        raise ValueError(f"q_norm and k_norm must share eps, got {eps} and {k_eps}")
    fn = _dispatch.resolve("qk_norm_rope", q, backend, prefer).fn
    return fn(q, k, freqs, (qw, qb), (kw, kb), norm, eps, interleaved)


# ----------------------------------------------------------------------------------------------------------
# Triton backend: torch.library custom ops (opaque to torch.compile, with fake impls and autograd), so that
# torch.compile(fullgraph=True) traces through them. Triton is imported only when a kernel runs.


def _kernels():
    from ..triton import rope as kernels

    return kernels


def _empty_like_contiguous(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=dtype or x.dtype)


@torch.library.custom_op("flagdit_kernels::apply_rope_triton", mutates_args=())
def _apply_rope_op(x: torch.Tensor, freqs: torch.Tensor, interleaved: bool, inverse: bool) -> torch.Tensor:
    return _kernels().apply_rope(x, freqs, interleaved, inverse)


@_apply_rope_op.register_fake
def _(x, freqs, interleaved, inverse):
    return _empty_like_contiguous(x)


def _apply_rope_setup(ctx, inputs, output):
    _, freqs, ctx.interleaved, ctx.inverse = inputs
    ctx.save_for_backward(freqs)


def _apply_rope_backward(ctx, grad):
    # The rotation is orthogonal: its transpose is the rotation by -angle. freqs is a table built from
    # integer positions and gets no gradient.
    (freqs,) = ctx.saved_tensors
    return _apply_rope_op(grad, freqs, ctx.interleaved, not ctx.inverse), None, None, None


_apply_rope_op.register_autograd(_apply_rope_backward, setup_context=_apply_rope_setup)


@torch.library.custom_op("flagdit_kernels::qk_norm_rope_triton", mutates_args=())
def _qk_norm_rope_op(
    q: torch.Tensor,
    k: torch.Tensor,
    freqs: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    norm: str,
    eps: float,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().qk_norm_rope_fwd(q, k, freqs, q_weight, q_bias, k_weight, k_bias, norm, eps, interleaved)


@_qk_norm_rope_op.register_fake
def _(q, k, freqs, q_weight, q_bias, k_weight, k_bias, norm, eps, interleaved):
    return _empty_like_contiguous(q), _empty_like_contiguous(k, q.dtype)


@torch.library.custom_op("flagdit_kernels::qk_norm_rope_backward_triton", mutates_args=())
def _qk_norm_rope_backward_op(
    dq_out: torch.Tensor,
    dk_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    freqs: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    k_bias: torch.Tensor | None,
    norm: str,
    eps: float,
    interleaved: bool,
) -> list[torch.Tensor]:
    grads = _kernels().qk_norm_rope_bwd(
        dq_out, dk_out, q, k, freqs, q_weight, q_bias, k_weight, k_bias, norm, eps, interleaved
    )
    # Custom ops cannot return None: an absent parameter's gradient comes back as an empty tensor.
    return [q.new_empty(0) if g is None else g for g in grads]


@_qk_norm_rope_backward_op.register_fake
def _(dq_out, dk_out, q, k, freqs, q_weight, q_bias, k_weight, k_bias, norm, eps, interleaved):
    params = (q_weight, q_bias, k_weight, k_bias)
    return [_empty_like_contiguous(q), _empty_like_contiguous(k)] + [
        q.new_empty(0) if p is None else _empty_like_contiguous(p) for p in params
    ]


def _qk_norm_rope_setup(ctx, inputs, output):
    q, k, freqs, qw, qb, kw, kb, ctx.norm, ctx.eps, ctx.interleaved = inputs
    ctx.has = tuple(t is not None for t in (qw, qb, kw, kb))
    ctx.save_for_backward(q, k, freqs, qw, qb, kw, kb)


def _qk_norm_rope_backward(ctx, dq_out, dk_out):
    q, k, freqs, qw, qb, kw, kb = ctx.saved_tensors
    dq_out = torch.zeros_like(q) if dq_out is None else dq_out
    dk_out = torch.zeros_like(k) if dk_out is None else dk_out
    dq, dk, dqw, dqb, dkw, dkb = _qk_norm_rope_backward_op(
        dq_out, dk_out, q, k, freqs, qw, qb, kw, kb, ctx.norm, ctx.eps, ctx.interleaved
    )
    params = [g if has else None for g, has in zip((dqw, dqb, dkw, dkb), ctx.has)]
    return dq, dk, None, *params, None, None, None


_qk_norm_rope_op.register_autograd(_qk_norm_rope_backward, setup_context=_qk_norm_rope_setup)


def _apply_rope_triton(x: torch.Tensor, freqs: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    return _apply_rope_op(x, freqs, interleaved, False)


def _qk_norm_rope_triton(q, k, freqs, q_norm, k_norm, norm, eps, interleaved):
    (qw, qb), (kw, kb) = q_norm, k_norm
    return _qk_norm_rope_op(q, k, freqs, qw, qb, kw, kb, "none" if norm is None else norm, float(eps), interleaved)


_dispatch.register("apply_rope", "triton", _apply_rope_triton, dtypes=_dispatch.FP32_MATH_DTYPES, **_dispatch.TRITON)
_dispatch.register(
    "qk_norm_rope", "triton", _qk_norm_rope_triton, dtypes=_dispatch.FP32_MATH_DTYPES, **_dispatch.TRITON
)
