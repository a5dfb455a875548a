"""Public ``pack`` / ``unpack``: latents of any (C, [F,] H, W) size <-> one packed token sequence."""

from __future__ import annotations

import torch

from .. import _dispatch
from .. import reference as ref
from .._extension import extension, extension_missing
from .._validation import check_tensor
from ..reference.packing import NEXTFRAME, NEXTLINE, PATCH, Packed, frames_hw, item_tokens  # noqa: F401


def _item_shapes(shapes: list[tuple[int, ...]]) -> list[int]:
    """(ndim, F, H, W) per item, flattened, as the compiled unpack takes them."""
    return [v for s in shapes for v in (len(s), *frames_hw(s))]


def _register_compiled_autograd() -> None:
    """Fake shapes and gradients for the compiled ops: pack's backward is an unpack and vice versa."""
    lib = torch.library

    @lib.register_fake("flagdit_kernels::pack_patches")
    def _(latents, patch_size, nextline, nextframe, channels_last, total_tokens):
        return latents[0].new_empty(total_tokens, latents[0].shape[0] * patch_size**2)

    @lib.register_fake("flagdit_kernels::unpack_patches")
    def _(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last):
        dims = [item_shapes[i : i + 4] for i in range(0, len(item_shapes), 4)]
        return [tokens.new_empty((channels, f, h, w) if nd == 4 else (channels, h, w)) for nd, f, h, w in dims]

    def pack_setup(ctx, inputs, output):
        latents, ctx.p, ctx.nextline, ctx.nextframe, ctx.channels_last, _ = inputs
        ctx.item_shapes = _item_shapes([tuple(x.shape) for x in latents])

    def pack_backward(ctx, grad):
        grads = torch.ops.flagdit_kernels.unpack_patches(
            grad,
            ctx.item_shapes,
            ctx.p,
            grad.shape[1] // ctx.p**2,
            ctx.nextline,
            ctx.nextframe,
            ctx.channels_last,
        )
        return list(grads), None, None, None, None, None

    def unpack_setup(ctx, inputs, output):
        tokens, ctx.item_shapes, ctx.p, ctx.channels, ctx.nextline, ctx.nextframe, ctx.channels_last = inputs
        ctx.total_tokens = tokens.shape[0]
        ctx.shapes = [tuple(o.shape) for o in output]

    def unpack_backward(ctx, grads):
        grads = _zeros_where_missing(grads, ctx.shapes, ctx.device, ctx.dtype)
        grad = torch.ops.flagdit_kernels.pack_patches(
            grads, ctx.p, ctx.nextline, ctx.nextframe, ctx.channels_last, ctx.total_tokens
        )
        return grad, None, None, None, None, None, None

    def unpack_setup_with_meta(ctx, inputs, output):
        unpack_setup(ctx, inputs, output)
        ctx.device, ctx.dtype = inputs[0].device, inputs[0].dtype

    lib.register_autograd("flagdit_kernels::pack_patches", pack_backward, setup_context=pack_setup)
    lib.register_autograd("flagdit_kernels::unpack_patches", unpack_backward, setup_context=unpack_setup_with_meta)


def _unpack_op_args(tokens, packed: Packed, out_channels, channels_last) -> tuple:
    """The positional arguments of every unpack op (cuda, triton custom op, triton eager twin)."""
    return (
        tokens,
        _item_shapes(packed.shapes),
        packed.patch_size,
        out_channels,
        packed.nextline,
        packed.nextframe,
        channels_last,
    )


def _unpack_compiled(tokens, packed: Packed, out_channels, channels_last) -> list[torch.Tensor]:
    return list(torch.ops.flagdit_kernels.unpack_patches(*_unpack_op_args(tokens, packed, out_channels, channels_last)))


# ----------------------------------------------------------------------------------------------------- triton
# torch.library custom ops around the Triton launchers (opaque to torch.compile: the launch reads data_ptr()s
# of the latents into its item table, which a fake tensor has not got). Pack's backward is an unpack of the
# gradient rows (placeholder rows are never read) and unpack's backward a pack (zeros at placeholder rows).


def _packed_len(shapes: list[tuple[int, ...]], p: int, nextline: bool, nextframe: bool) -> tuple[int, int]:
    """(tokens, patch tokens) of a batch of latent shapes."""
    tokens = patches = 0
    for s in shapes:
        f, h, w = frames_hw(s)
        tokens += item_tokens(s, p, nextline, nextframe)
        patches += f * (h // p) * (w // p)
    return tokens, patches


@torch.library.custom_op("flagdit_kernels::triton_pack_layout", mutates_args=())
def _triton_pack_layout(
    latents: list[torch.Tensor], patch_size: int, nextline: bool, nextframe: bool, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(patches, positions, kind, patch_rows, cu_seqlens) in one launch."""
    from ..triton import packing as tk

    fhw = [frames_hw(tuple(x.shape)) for x in latents]
    return tk.pack(latents, fhw, patch_size, nextline, nextframe, channels_last, with_layout=True)


def _pack_layout_fake(latents, patch_size, nextline, nextframe, channels_last):
    x0 = latents[0]
    total, n_patches = _packed_len([tuple(x.shape) for x in latents], patch_size, nextline, nextframe)
    return (
        x0.new_empty(total, x0.shape[0] * patch_size**2),
        x0.new_empty(total, 3, dtype=torch.int32),
        x0.new_empty(total, dtype=torch.int8),
        x0.new_empty(n_patches, dtype=torch.int64),
        x0.new_empty(len(latents) + 1, dtype=torch.int32),
    )


_triton_pack_layout.register_fake(_pack_layout_fake)


@torch.library.custom_op("flagdit_kernels::triton_pack_patches", mutates_args=())
def _triton_pack_patches(
    latents: list[torch.Tensor],
    patch_size: int,
    nextline: bool,
    nextframe: bool,
    channels_last: bool,
    total_tokens: int,
) -> torch.Tensor:
    """Token rows only (the backward of unpack); same schema as the compiled ``pack_patches``."""
    from ..triton import packing as tk

    fhw = [frames_hw(tuple(x.shape)) for x in latents]
    return tk.pack(latents, fhw, patch_size, nextline, nextframe, channels_last, with_layout=False)


@_triton_pack_patches.register_fake
def _(latents, patch_size, nextline, nextframe, channels_last, total_tokens):
    return latents[0].new_empty(total_tokens, latents[0].shape[0] * patch_size**2)


@torch.library.custom_op("flagdit_kernels::triton_unpack_patches", mutates_args=())
def _triton_unpack_patches(
    tokens: torch.Tensor,
    item_shapes: list[int],
    patch_size: int,
    channels: int,
    nextline: bool,
    nextframe: bool,
    channels_last: bool,
) -> list[torch.Tensor]:
    from ..triton import packing as tk

    return tk.unpack(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last)


@_triton_unpack_patches.register_fake
def _(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last):
    dims = [item_shapes[i : i + 4] for i in range(0, len(item_shapes), 4)]
    return [tokens.new_empty((channels, f, h, w) if nd == 4 else (channels, h, w)) for nd, f, h, w in dims]


def _register_pack_autograd(pack_op, unpack_op, layout: bool) -> None:
    """Pack's backward = ``unpack_op`` of the gradient rows; with ``layout`` the op also returns int tensors."""

    def setup(ctx, inputs, output):
        latents, ctx.p, ctx.nextline, ctx.nextframe, ctx.channels_last = inputs[:5]
        ctx.item_shapes = _item_shapes([tuple(x.shape) for x in latents])

    def backward(ctx, grad, *_int_grads):
        grads = unpack_op(
            grad, ctx.item_shapes, ctx.p, grad.shape[1] // ctx.p**2, ctx.nextline, ctx.nextframe, ctx.channels_last
        )
        return (list(grads), None, None, None, None) + (() if layout else (None,))

    torch.library.register_autograd(pack_op, backward, setup_context=setup)


def _zeros_where_missing(grads, shapes, device, dtype) -> list[torch.Tensor]:
    """Autograd passes None for latents whose gradient is unused; pack needs a tensor for every item."""
    return [torch.zeros(s, device=device, dtype=dtype) if g is None else g for g, s in zip(grads, shapes)]


def _register_unpack_autograd(unpack_op, pack_op) -> None:
    """Unpack's backward = ``pack_op`` of the latent gradients (missing ones are zeros)."""

    def setup(ctx, inputs, output):
        tokens, ctx.item_shapes, ctx.p, ctx.channels, ctx.nextline, ctx.nextframe, ctx.channels_last = inputs
        ctx.total_tokens, ctx.device, ctx.dtype = tokens.shape[0], tokens.device, tokens.dtype
        ctx.shapes = [tuple(o.shape) for o in output]

    def backward(ctx, grads):
        grads = _zeros_where_missing(grads, ctx.shapes, ctx.device, ctx.dtype)
        grad = pack_op(grads, ctx.p, ctx.nextline, ctx.nextframe, ctx.channels_last, ctx.total_tokens)
        return grad, None, None, None, None, None, None

    torch.library.register_autograd(unpack_op, backward, setup_context=setup)


_register_pack_autograd(_triton_pack_layout, _triton_unpack_patches, layout=True)
_register_pack_autograd(_triton_pack_patches, _triton_unpack_patches, layout=False)
_register_unpack_autograd(_triton_unpack_patches, _triton_pack_patches)


# Eager twins of the custom ops above. A torch.library custom op costs tens of microseconds of Python per
# call (dispatcher round trips through its Python autograd and device kernels), more than this launch-bound
# op's whole GPU time on a mixed batch; outside torch.compile the same launchers run under these
# autograd.Functions instead. Their backward passes call the twins again, so double backward works too.


def _pack_forward(ctx, patch_size, nextline, nextframe, channels_last, latents, with_layout: bool):
    from ..triton import packing as tk

    fhw = [frames_hw(tuple(x.shape)) for x in latents]
    ctx.args = (_item_shapes([tuple(x.shape) for x in latents]), patch_size, nextline, nextframe, channels_last)
    return tk.pack(latents, fhw, patch_size, nextline, nextframe, channels_last, with_layout=with_layout)


def _pack_backward(ctx, grad):
    """Pack's backward is unpack of the patch-row gradient, giving one gradient per latent."""
    item_shapes, p, nextline, nextframe, channels_last = ctx.args
    channels = grad.shape[1] // p**2
    grads = _TritonUnpack.apply(grad, item_shapes, p, channels, nextline, nextframe, channels_last)
    return (None, None, None, None, *grads)


class _TritonPackLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, patch_size, nextline, nextframe, channels_last, *latents):
        out = _pack_forward(ctx, patch_size, nextline, nextframe, channels_last, latents, with_layout=True)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad, *_int_grads):
        return _pack_backward(ctx, grad)


class _TritonPackRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, patch_size, nextline, nextframe, channels_last, *latents):
        return _pack_forward(ctx, patch_size, nextline, nextframe, channels_last, latents, with_layout=False)

    @staticmethod
    def backward(ctx, grad):
        return _pack_backward(ctx, grad)


class _TritonUnpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last):
        from ..triton import packing as tk

        ctx.args = (patch_size, nextline, nextframe, channels_last)
        ctx.device, ctx.dtype = tokens.device, tokens.dtype
        outs = tk.unpack(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last)
        ctx.shapes = [tuple(o.shape) for o in outs]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        p, nextline, nextframe, channels_last = ctx.args
        grads = _zeros_where_missing(grads, ctx.shapes, ctx.device, ctx.dtype)
        return _TritonPackRows.apply(p, nextline, nextframe, channels_last, *grads), None, None, None, None, None, None


def _pack_triton(latents, patch_size, nextline, nextframe, channels_last) -> Packed:
    shapes = [tuple(x.shape) for x in latents]
    if torch.compiler.is_compiling():
        out = _triton_pack_layout(latents, patch_size, nextline, nextframe, channels_last)
    else:
        out = _TritonPackLayout.apply(patch_size, nextline, nextframe, channels_last, *latents)
    patches, positions, kind, rows, cu = out
    max_len = max(item_tokens(s, patch_size, nextline, nextframe) for s in shapes)
    return Packed(patches, cu, max_len, positions, kind, shapes, patch_size, nextline, nextframe, rows)


def _unpack_triton(tokens, packed: Packed, out_channels, channels_last) -> list[torch.Tensor]:
    args = _unpack_op_args(tokens, packed, out_channels, channels_last)
    if torch.compiler.is_compiling():
        return _triton_unpack_patches(*args)
    return list(_TritonUnpack.apply(*args))


# ------------------------------------------------------------------------------------------------------- cuda


def _register_layout_autograd() -> None:
    """``pack_patches_layout`` (csrc/bindings.cpp; CPU and CUDA kernels): fake shapes and its backward."""
    torch.library.register_fake("flagdit_kernels::pack_patches_layout", _pack_layout_fake)
    _register_pack_autograd(
        "flagdit_kernels::pack_patches_layout", torch.ops.flagdit_kernels.unpack_patches, layout=True
    )


def _pack_compiled(latents, patch_size, nextline, nextframe, channels_last) -> Packed:
    """The compiled pack (cpu or cuda by the latents' device): patches and the layout from one pass."""
    shapes = [tuple(x.shape) for x in latents]
    patches, positions, kind, rows, cu = torch.ops.flagdit_kernels.pack_patches_layout(
        latents, patch_size, nextline, nextframe, channels_last
    )
    max_len = max(item_tokens(s, patch_size, nextline, nextframe) for s in shapes)
    return Packed(patches, cu, max_len, positions, kind, shapes, patch_size, nextline, nextframe, rows)


_dispatch.register("pack", "reference", ref.pack, devices=("cpu", "cuda"))
_dispatch.register("unpack", "reference", ref.unpack, devices=("cpu", "cuda"))
if extension() is not None:
    _register_compiled_autograd()
    _register_layout_autograd()
_dispatch.register("pack", "cpu", _pack_compiled, devices=("cpu",), missing=extension_missing)
_dispatch.register("unpack", "cpu", _unpack_compiled, devices=("cpu",), missing=extension_missing)
_dispatch.register("pack", "triton", _pack_triton, **_dispatch.TRITON)
_dispatch.register("unpack", "triton", _unpack_triton, **_dispatch.TRITON)
_cuda = lambda: extension_missing(cuda=True)
_dispatch.register("pack", "cuda", _pack_compiled, devices=("cuda",), missing=_cuda)
_dispatch.register("unpack", "cuda", _unpack_compiled, devices=("cuda",), missing=_cuda)


def _check_latents(latents: object, patch_size: object) -> list[torch.Tensor]:
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if isinstance(latents, torch.Tensor) and latents.dim() in (4, 5):
        latents = list(latents.unbind(0))
    if not isinstance(latents, (list, tuple)) or len(latents) == 0:
        raise ValueError("latents must be a non-empty list of (C, H, W) or (C, F, H, W) tensors")
    first = check_tensor("latents[0]", latents[0], ndim=(3, 4))
    for i, x in enumerate(latents):
        check_tensor(f"latents[{i}]", x, ndim=(3, 4), device=first.device)
        if x.dtype != first.dtype:
            raise TypeError(f"latents[{i}] has dtype {x.dtype} but latents[0] has {first.dtype}")
        if x.shape[0] != first.shape[0]:
            raise ValueError(f"latents[{i}] has {x.shape[0]} channels but latents[0] has {first.shape[0]}")
        f, h, w = frames_hw(tuple(x.shape))
        if f < 1 or h < patch_size or w < patch_size or h % patch_size or w % patch_size:
            raise ValueError(
                f"latents[{i}] of shape {tuple(x.shape)}: H and W must be positive multiples of "
                f"patch_size={patch_size} and F >= 1"
            )
    return list(latents)


def pack(
    latents: list[torch.Tensor],
    patch_size: int,
    nextline: bool = True,
    nextframe: bool = True,
    *,
    channels_last: bool = False,
    backend: str | None = None,
    prefer: str | None = None,
) -> Packed:
    """Packs a list of ``(C, H, W)`` / ``(C, F, H, W)`` latents into one token sequence.

    Each item yields ``F * (H/p) * (W/p + nextline) + (F - 1 if nextframe else 0)`` tokens in row-major
    order: a [nextline] slot closes every patch row and a [nextframe] slot separates frames. Returns a
    :class:`Packed` with ``patches (T, C*p*p)`` (zeros at slots; (C, ph, pw) vector order, or (ph, pw, C)
    with ``channels_last``), ``cu_seqlens``, ``max_seqlen``, ``positions (T, 3)``, ``kind (T,)`` and shapes.
    """
    latents = _check_latents(latents, patch_size)
    fn = _dispatch.resolve("pack", latents[0], backend, prefer).fn
    return fn(latents, patch_size, bool(nextline), bool(nextframe), bool(channels_last))


def unpack(
    tokens: torch.Tensor,
    packed: Packed,
    out_channels: int,
    *,
    channels_last: bool = True,
    backend: str | None = None,
    prefer: str | None = None,
) -> list[torch.Tensor]:
    """Reads token vectors ``(T, p*p*out_channels)`` back into latents shaped like ``packed``'s items.

    Placeholder rows are dropped. Vectors are read in (ph, pw, C) order (Lumina's final layer), or
    (C, ph, pw) with ``channels_last=False`` (then ``unpack(pack(x).patches, ...)`` returns x exactly).
    """
    if not isinstance(packed, Packed):
        raise TypeError(f"packed must be a Packed from fk.pack, got {type(packed).__name__}")
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
    check_tensor("tokens", tokens, ndim=2, device=packed.kind.device)
    want = (packed.kind.shape[0], packed.patch_size**2 * out_channels)
    if tuple(tokens.shape) != want:
        raise ValueError(
            f"tokens must be (T, p*p*out_channels) = {want} for this packed batch, got {tuple(tokens.shape)}"
        )
    fn = _dispatch.resolve("unpack", tokens, backend, prefer).fn
    return fn(tokens, packed, out_channels, bool(channels_last))
