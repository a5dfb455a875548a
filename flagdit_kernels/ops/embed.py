"""Public ``embed_packed``: the patch-embedding Linear on a packed sequence plus learned placeholder embeddings.

Backends: ``reference`` (eager torch: linear, gather, where) and ``triton`` (cuBLAS GEMM with fused bias, then
one Triton launch that writes the placeholder rows in place; see ``flagdit_kernels/triton/embed.py``). The
triton backend's backward needs no (T, dim) mask copy either: with ``sel`` the (T, 3) one-hot of (patch,
[nextline], [nextframe]),
``grad_out.T @ sel`` gives the bias gradient (column 0) and both placeholder gradients (columns 1, 2) in one
GEMM, ``grad_weight = grad_out.T @ (patches * sel[:, :1])`` and ``grad_patches = (grad_out @ weight) * sel[:, :1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _dispatch
from .._validation import check_same_dtype, check_shape, check_tensor
from ..reference.embed import embed_packed as _embed_reference

__all__ = ["embed_packed"]


def _embed_forward(patches, kind, weight, bias, placeholder_embeddings):
    from ..triton.embed import write_placeholder_rows

    out = F.linear(patches, weight, bias)
    write_placeholder_rows(out, kind, placeholder_embeddings.contiguous())
    return out


def _embed_backward(grad, patches, kind, weight, has_bias: bool, table_dtype):
    # (T, 3): patch, nextline, nextframe (a kind outside {0, 1, 2} is a patch row, as in the forward)
    sel = torch.stack([(kind != 1) & (kind != 2), kind == 1, kind == 2], 1).to(grad.dtype)
    is_patch = sel[:, :1]
    sums = grad.t() @ sel  # (dim, 3): bias gradient, [nextline] and [nextframe] gradients
    grad_patches = (grad @ weight) * is_patch
    grad_weight = grad.t() @ (patches * is_patch)
    grad_bias = sums[:, 0] if has_bias else None
    return grad_patches, grad_weight, grad_bias, sums[:, 1:].t().to(table_dtype)


@torch.library.custom_op("flagdit_kernels::triton_embed_packed", mutates_args=())
def _triton_embed_packed(
    patches: torch.Tensor,
    kind: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    placeholder_embeddings: torch.Tensor,
) -> torch.Tensor:
    return _embed_forward(patches, kind, weight, bias, placeholder_embeddings)


@_triton_embed_packed.register_fake
def _(patches, kind, weight, bias, placeholder_embeddings):
    return patches.new_empty(patches.shape[0], weight.shape[0])


def _setup(ctx, inputs, output):
    patches, kind, weight, bias, table = inputs
    ctx.save_for_backward(patches, kind, weight)
    ctx.has_bias = bias is not None
    ctx.table_dtype = table.dtype


def _backward(ctx, grad):
    patches, kind, weight = ctx.saved_tensors
    grad_patches, grad_weight, grad_bias, grad_table = _embed_backward(
        grad, patches, kind, weight, ctx.has_bias, ctx.table_dtype
    )
    return grad_patches, None, grad_weight, grad_bias, grad_table


_triton_embed_packed.register_autograd(_backward, setup_context=_setup)


class _EmbedPacked(torch.autograd.Function):
    """The eager twin of the custom op (a custom op's Python dispatch costs tens of microseconds a call)."""

    @staticmethod
    def forward(ctx, patches, kind, weight, bias, placeholder_embeddings):
        inputs = (patches, kind, weight, bias, placeholder_embeddings)
        _setup(ctx, inputs, None)
        return _embed_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad)


def _embed_triton(patches, kind, weight, bias, placeholder_embeddings):
    if torch.compiler.is_compiling():
        return _triton_embed_packed(patches, kind, weight, bias, placeholder_embeddings)
    return _EmbedPacked.apply(patches, kind, weight, bias, placeholder_embeddings)


_dispatch.register("embed_packed", "reference", _embed_reference, devices=("cpu", "cuda"))
_dispatch.register("embed_packed", "triton", _embed_triton, **_dispatch.TRITON)


def embed_packed(
    patches: torch.Tensor,
    kind: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    placeholder_embeddings: torch.Tensor,
    *,
    backend: str | None = None,
    prefer: str | None = None,
) -> torch.Tensor:
    """Embeds a packed sequence: ``(T, dim)`` with ``patches @ weight.T + bias`` at patch rows (``kind == 0``)
    and the learned ``placeholder_embeddings[kind - 1]`` at placeholder rows (row 0 [nextline], row 1
    [nextframe]).

    ``patches (T, C*p*p)`` and ``kind`` int8 ``(T,)`` come from :func:`flagdit_kernels.pack`; ``weight (dim,
    C*p*p)`` and ``bias (dim,)`` (or None) are the patch-embedding Linear's; ``placeholder_embeddings (2, dim)``.
    Differentiable in patches (zero at placeholder rows), weight, bias and placeholder_embeddings.
    ``kind`` values are not checked (that would cost a device sync): a value outside {0, 1, 2} makes a patch
    row on every backend.
    """
    check_tensor("patches", patches, ndim=2)
    device = patches.device
    check_tensor("kind", kind, ndim=1, dtypes=(torch.int8,), device=device)
    check_tensor("weight", weight, ndim=2, device=device)
    check_tensor("placeholder_embeddings", placeholder_embeddings, ndim=2, device=device)
    if kind.shape[0] != patches.shape[0]:
        raise ValueError(f"kind must have one entry per patches row ({patches.shape[0]}), got {kind.shape[0]}")
    if weight.shape[1] != patches.shape[1]:
        raise ValueError(
            f"weight must be (dim, {patches.shape[1]}) to embed patches of width {patches.shape[1]}, "
            f"got {tuple(weight.shape)}"
        )
    dim = weight.shape[0]
    check_shape("placeholder_embeddings", placeholder_embeddings, (2, dim))
    tensors = {"weight": weight, "placeholder_embeddings": placeholder_embeddings}
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=device)
        check_shape("bias", bias, (dim,))
        tensors["bias"] = bias
    for name, t in tensors.items():
        check_same_dtype(name, t, "patches", patches)
    fn = _dispatch.resolve("embed_packed", patches, backend, prefer).fn
    return fn(patches, kind, weight, bias, placeholder_embeddings)
