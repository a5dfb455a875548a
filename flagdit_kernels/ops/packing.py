"""Public ``pack`` / ``unpack``: latents of any (C, [F,] H, W) size <-> one packed token sequence."""

from __future__ import annotations

import torch

from .. import _dispatch
from .. import reference as ref
from .._extension import extension, extension_error
from .._validation import check_tensor
from ..reference.packing import Packed, frames_hw, token_layout


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
        grads = [
            torch.zeros(s, device=ctx.device, dtype=ctx.dtype) if g is None else g for g, s in zip(grads, ctx.shapes)
        ]
        grad = torch.ops.flagdit_kernels.pack_patches(
            grads, ctx.p, ctx.nextline, ctx.nextframe, ctx.channels_last, ctx.total_tokens
        )
        return grad, None, None, None, None, None, None

    def unpack_setup_with_meta(ctx, inputs, output):
        unpack_setup(ctx, inputs, output)
        ctx.device, ctx.dtype = inputs[0].device, inputs[0].dtype

    lib.register_autograd("flagdit_kernels::pack_patches", pack_backward, setup_context=pack_setup)
    lib.register_autograd("flagdit_kernels::unpack_patches", unpack_backward, setup_context=unpack_setup_with_meta)


def _pack_compiled(latents, patch_size, nextline, nextframe, channels_last) -> Packed:
    shapes = [tuple(x.shape) for x in latents]
    cu, max_len, positions, kind, rows = token_layout(shapes, patch_size, nextline, nextframe, latents[0].device)
    patches = torch.ops.flagdit_kernels.pack_patches(
        latents, patch_size, nextline, nextframe, channels_last, kind.shape[0]
    )
    return Packed(patches, cu, max_len, positions, kind, shapes, patch_size, nextline, nextframe, rows)


def _unpack_compiled(tokens, packed: Packed, out_channels, channels_last) -> list[torch.Tensor]:
    return list(
        torch.ops.flagdit_kernels.unpack_patches(
            tokens,
            _item_shapes(packed.shapes),
            packed.patch_size,
            out_channels,
            packed.nextline,
            packed.nextframe,
            channels_last,
        )
    )


_dispatch.register("pack", "reference", ref.pack, devices=("cpu", "cuda"))
_dispatch.register("unpack", "reference", ref.unpack, devices=("cpu", "cuda"))
if extension() is not None:
    _register_compiled_autograd()
_compiled = dict(
    available=lambda: extension() is not None, why_not=lambda: f"no compiled extension ({extension_error()})"
)
_dispatch.register("pack", "cpu", _pack_compiled, devices=("cpu",), **_compiled)
_dispatch.register("unpack", "cpu", _unpack_compiled, devices=("cpu",), **_compiled)


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
) -> Packed:
    """Packs a list of ``(C, H, W)`` / ``(C, F, H, W)`` latents into one token sequence.

    Each item yields ``F * (H/p) * (W/p + nextline) + (F - 1 if nextframe else 0)`` tokens in row-major
    order: a [nextline] slot closes every patch row and a [nextframe] slot separates frames. Returns a
    :class:`Packed` with ``patches (T, C*p*p)`` (zeros at slots; (C, ph, pw) vector order, or (ph, pw, C)
    with ``channels_last``), ``cu_seqlens``, ``max_seqlen``, ``positions (T, 3)``, ``kind (T,)`` and shapes.
    """
    latents = _check_latents(latents, patch_size)
    _, fn = _dispatch.resolve("pack", latents[0].device, backend)
    return fn(latents, patch_size, bool(nextline), bool(nextframe), bool(channels_last))


def unpack(
    tokens: torch.Tensor,
    packed: Packed,
    out_channels: int,
    *,
    channels_last: bool = True,
    backend: str | None = None,
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
    _, fn = _dispatch.resolve("unpack", tokens.device, backend)
    return fn(tokens, packed, out_channels, bool(channels_last))
