"""Public ``pack`` / ``unpack``: latents of any (C, [F,] H, W) size <-> one packed token sequence.

Backends: ``reference`` (PyTorch), ``cpu`` and ``cuda`` (the compiled extension: ``csrc/packing_*``, ops
``flagdit_kernels::pack_patches_layout`` / ``pack_patches`` / ``unpack_patches``) and ``triton``
(``flagdit_kernels/triton/packing.py``, wrapped as custom ops with the same schemas).

One autograd formula serves every backend: pack's backward is an unpack of the gradient rows (placeholder
rows are never read) and unpack's backward a pack of the latent gradients (zeros at placeholder rows; a
latent whose gradient autograd leaves out counts as zeros), both again differentiable. Each backend is a
:class:`_Kernels` triple (pack with the layout, pack rows only, unpack). Under ``torch.compile`` the triple's
ops run, with fake impls and ``register_autograd`` (the Triton launch reads ``data_ptr()``s into its item
table, which fake tensors have not got); eagerly the same launchers run under :class:`_Pack` and
:class:`_Unpack`, because a ``torch.library`` custom op costs tens of microseconds of Python dispatch per
call, more than this launch-bound op's whole GPU time on a mixed batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _dispatch
from .. import reference as ref
from .._conventions import frames_hw, item_shapes
from .._extension import extension, extension_missing
from .._validation import check_int, check_same_dtype, check_tensor, values_checked
from ..reference.packing import NEXTFRAME, NEXTLINE, PATCH, Packed, TileLayout, item_tokens, tile_layout

__all__ = ["NEXTFRAME", "NEXTLINE", "PATCH", "Packed", "TileLayout", "pack", "unpack"]


def pack(
    latents: list[torch.Tensor],
    patch_size: int,
    nextline: bool = True,
    nextframe: bool = True,
    *,
    channels_last: bool = False,
    tile: tuple[int, int, int] | None = None,
    backend: str | None = None,
    prefer: str | None = None,
) -> Packed:
    """Packs a list of ``(C, H, W)`` / ``(C, F, H, W)`` latents into one token sequence.

    Each item yields ``F * (H/p) * (W/p + nextline) + (F - 1 if nextframe else 0)`` tokens in row-major
    order: a [nextline] slot closes every patch row and a [nextframe] slot separates frames. Returns a
    :class:`Packed` with ``patches (T, C*p*p)`` (zeros at slots; (C, ph, pw) vector order, or (ph, pw, C)
    with ``channels_last``), ``cu_seqlens``, ``max_seqlen``, ``positions (T, 3)``, ``kind (T,)`` and shapes.

    With ``tile=(tt, th, tw)`` (positive patch counts) the tokens are tile-major instead: an item's patches
    tile by tile (``tt`` frames x ``th`` rows x ``tw`` columns, edge tiles partial, raster order of tiles and
    inside a tile), then its placeholder slots; positions are unchanged and ``Packed.tiles`` (a
    :class:`TileLayout`) describes the tiles, for tile-sparse attention.
    """
    latents = _check_latents(latents, patch_size)
    tile = _check_tile(tile)
    fn = _dispatch.resolve("pack", latents[0], backend, prefer).fn
    return fn(latents, patch_size, bool(nextline), bool(nextframe), bool(channels_last), tile)


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
    _check_packed(packed)
    check_int("out_channels", out_channels, 1)
    check_tensor("tokens", tokens, ndim=2, device=packed.kind.device)
    want = (packed.kind.shape[0], packed.patch_size**2 * out_channels)
    if tuple(tokens.shape) != want:
        raise ValueError(
            f"tokens must be (T, p*p*out_channels) = {want} for this packed batch, got {tuple(tokens.shape)}"
        )
    fn = _dispatch.resolve("unpack", tokens, backend, prefer).fn
    return fn(tokens, packed, out_channels, bool(channels_last))


def _check_tile(tile: object) -> tuple[int, int, int] | None:
    """None (raster order) or three positive ints (frames, rows, columns of patches per tile)."""
    if tile is None:
        return None
    if not isinstance(tile, (tuple, list)) or len(tile) != 3:
        raise ValueError(f"tile must be None or (frames, rows, cols) of patches per tile, got {tile!r}")
    return tuple(check_int(f"tile[{i}]", t, 1) for i, t in enumerate(tile))


def _check_latents(latents: object, patch_size: object) -> list[torch.Tensor]:
    check_int("patch_size", patch_size, 1)
    if isinstance(latents, torch.Tensor) and latents.dim() in (4, 5):
        latents = list(latents.unbind(0))
    if not isinstance(latents, (list, tuple)) or len(latents) == 0:
        raise ValueError("latents must be a non-empty list of (C, H, W) or (C, F, H, W) tensors")
    first = check_tensor("latents[0]", latents[0], ndim=(3, 4))
    for i, x in enumerate(latents):
        check_tensor(f"latents[{i}]", x, ndim=(3, 4), device=first.device)
        check_same_dtype(f"latents[{i}]", x, "latents[0]", first)
        if x.shape[0] != first.shape[0]:
            raise ValueError(f"latents[{i}] has {x.shape[0]} channels but latents[0] has {first.shape[0]}")
        _check_item_shape(f"latents[{i}]", tuple(x.shape), patch_size)
    return list(latents)


def _check_item_shape(name: str, shape: tuple[int, ...], patch_size: int) -> None:
    if len(shape) not in (3, 4) or shape[0] < 1:
        raise ValueError(f"{name} must be (C, H, W) or (C, F, H, W) with C >= 1, got {shape}")
    f, h, w = frames_hw(shape)
    if f < 1 or h < patch_size or w < patch_size or h % patch_size or w % patch_size:
        raise ValueError(
            f"{name} of shape {shape}: H and W must be positive multiples of patch_size={patch_size} and F >= 1"
        )


def _check_packed(packed: object) -> None:
    """A :class:`Packed` whose fields agree with each other (Python values and tensor shapes: no device work).

    The unpack kernels write each item's (C, [F,] H, W) output from its shape alone, so a hand-built or edited
    ``Packed`` whose shapes do not tile the token rows (H not a multiple of the patch size, more items than
    offsets, a token count the shapes do not give) would leave output memory unwritten; it is refused here.
    """
    if not isinstance(packed, Packed):
        raise TypeError(f"packed must be a Packed from fk.pack, got {type(packed).__name__}")
    p = check_int("packed.patch_size", packed.patch_size, 1)
    for flag in ("nextline", "nextframe"):
        if not isinstance(getattr(packed, flag), bool):
            raise TypeError(f"packed.{flag} must be a bool, got {type(getattr(packed, flag)).__name__}")
    if not isinstance(packed.shapes, (list, tuple)) or not packed.shapes:
        raise ValueError(f"packed.shapes must be a non-empty list of latent shapes, got {packed.shapes!r}")
    for i, shape in enumerate(packed.shapes):
        if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"packed.shapes[{i}] must be a tuple of ints, got {shape!r}")
        _check_item_shape(f"packed.shapes[{i}]", tuple(shape), p)
    kind = check_tensor("packed.kind", packed.kind, ndim=1, dtypes=(torch.int8,))
    device, shapes = kind.device, [tuple(s) for s in packed.shapes]
    tokens, patches = _packed_len(shapes, p, packed.nextline, packed.nextframe)
    if kind.shape[0] != tokens:
        raise ValueError(f"packed.kind has {kind.shape[0]} tokens but packed.shapes give {tokens}")
    check_tensor("packed.cu_seqlens", packed.cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if packed.cu_seqlens.shape[0] != len(shapes) + 1:
        raise ValueError(
            f"packed.cu_seqlens must have {len(shapes) + 1} entries for {len(shapes)} items, "
            f"got {packed.cu_seqlens.shape[0]}"
        )
    lengths = [item_tokens(s, p, packed.nextline, packed.nextframe) for s in shapes]
    if packed.max_seqlen != max(lengths):
        raise ValueError(f"packed.max_seqlen ({packed.max_seqlen!r}) must be the longest item ({max(lengths)})")
    if _check_tile(packed.tile) != (None if packed.tiles is None else packed.tiles.tile):
        raise ValueError(f"packed.tile ({packed.tile!r}) disagrees with packed.tiles; build a Packed with fk.pack")
    if packed.patch_rows is not None:
        check_tensor("packed.patch_rows", packed.patch_rows, ndim=1, dtypes=(torch.int64,), device=device)
        if packed.patch_rows.shape[0] != patches:
            raise ValueError(f"packed.patch_rows has {packed.patch_rows.shape[0]} rows but the shapes hold {patches}")
    if values_checked(device):
        offsets = [0, *itertools.accumulate(lengths)]
        if packed.cu_seqlens.tolist() != offsets:
            raise ValueError(f"packed.cu_seqlens ({packed.cu_seqlens.tolist()}) disagrees with packed.shapes {offsets}")


# ------------------------------------------------------------------------------------------------------------
# One backend = three launchers with the compiled ops' schemas (positional arguments below), and the autograd
# formula they share.


@dataclass(frozen=True)
class _Kernels:
    # Each takes the token order's tile last: [0, 0, 0] raster, [tt, th, tw] tile-major. Never the empty list the
    # schemas also take as raster: torch.library wants an empty list's "gradient" as [] from a direct call but as
    # None from a graph torch.compile traced, while a list of ints is None in both.
    # (latents, patch_size, nextline, nextframe, channels_last, tile)
    #   -> (patches, positions, kind, patch_rows, cu_seqlens)
    pack_layout: Callable
    # (latents, patch_size, nextline, nextframe, channels_last, total_tokens, tile) -> patches
    pack_rows: Callable
    # (tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last, tile) -> list of latents
    unpack: Callable


def _packed_len(shapes: list[tuple[int, ...]], p: int, nextline: bool, nextframe: bool) -> tuple[int, int]:
    """(tokens, patch tokens) of a batch of latent shapes."""
    tokens = patches = 0
    for s in shapes:
        f, h, w = frames_hw(s)
        tokens += item_tokens(s, p, nextline, nextframe)
        patches += f * (h // p) * (w // p)
    return tokens, patches


RASTER = (0, 0, 0)  # the compiled ops' tile for raster order (see _Kernels)


def _pack_setup(ctx, latents, patch_size, nextline, nextframe, channels_last, tile) -> None:
    ctx.item_shapes = item_shapes([tuple(x.shape) for x in latents])
    ctx.flags = (patch_size, nextline, nextframe, channels_last)
    ctx.tile = list(tile)


def _pack_grads(ctx, grad: torch.Tensor, unpack_fn: Callable) -> list[torch.Tensor]:
    """Pack's backward: the unpack of the patch-row gradient, one gradient per latent."""
    p, nextline, nextframe, channels_last = ctx.flags
    channels = grad.shape[1] // p**2
    return list(unpack_fn(grad, ctx.item_shapes, p, channels, nextline, nextframe, channels_last, ctx.tile))


def _unpack_setup(ctx, tokens, outputs, patch_size, nextline, nextframe, channels_last, tile) -> None:
    ctx.flags = (patch_size, nextline, nextframe, channels_last)
    ctx.tile = list(tile)
    ctx.total_tokens, ctx.device, ctx.dtype = tokens.shape[0], tokens.device, tokens.dtype
    ctx.shapes = [tuple(o.shape) for o in outputs]


def _unpack_grad(ctx, grads, pack_rows_fn: Callable) -> torch.Tensor:
    """Unpack's backward: the pack of the latent gradients (zeros for a latent that autograd gives none)."""
    grads = [torch.zeros(s, device=ctx.device, dtype=ctx.dtype) if g is None else g for g, s in zip(grads, ctx.shapes)]
    return pack_rows_fn(grads, *ctx.flags, ctx.total_tokens, ctx.tile)


def _pack_layout_fake(latents, patch_size, nextline, nextframe, channels_last, tile=()):
    x0 = latents[0]
    total, n_patches = _packed_len([tuple(x.shape) for x in latents], patch_size, nextline, nextframe)
    return (
        x0.new_empty(total, x0.shape[0] * patch_size**2),
        x0.new_empty(total, 3, dtype=torch.int32),
        x0.new_empty(total, dtype=torch.int8),
        x0.new_empty(n_patches, dtype=torch.int64),
        x0.new_empty(len(latents) + 1, dtype=torch.int32),
    )


def _pack_rows_fake(latents, patch_size, nextline, nextframe, channels_last, total_tokens, tile=()):
    return latents[0].new_empty(total_tokens, latents[0].shape[0] * patch_size**2)


def _unpack_fake(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last, tile=()):
    dims = [item_shapes[i : i + 4] for i in range(0, len(item_shapes), 4)]
    return [tokens.new_empty((channels, f, h, w) if nd == 4 else (channels, h, w)) for nd, f, h, w in dims]


def _register_compile_path(ops: _Kernels) -> None:
    """Fake impls and autograd of one backend's three ops (what torch.compile traces)."""
    lib = torch.library
    lib.register_fake(ops.pack_layout, _pack_layout_fake)
    lib.register_fake(ops.pack_rows, _pack_rows_fake)
    lib.register_fake(ops.unpack, _unpack_fake)

    def pack_setup(ctx, inputs, output):
        _pack_setup(ctx, *inputs[:5], inputs[-1])

    def pack_layout_backward(ctx, grad, *_int_grads):
        return _pack_grads(ctx, grad, ops.unpack), None, None, None, None, None

    def pack_rows_backward(ctx, grad):
        return _pack_grads(ctx, grad, ops.unpack), None, None, None, None, None, None

    def unpack_setup(ctx, inputs, output):
        tokens, _, patch_size, _, nextline, nextframe, channels_last, tile = inputs
        _unpack_setup(ctx, tokens, output, patch_size, nextline, nextframe, channels_last, tile)

    def unpack_backward(ctx, grads):
        return _unpack_grad(ctx, grads, ops.pack_rows), None, None, None, None, None, None, None

    lib.register_autograd(ops.pack_layout, pack_layout_backward, setup_context=pack_setup)
    lib.register_autograd(ops.pack_rows, pack_rows_backward, setup_context=pack_setup)
    lib.register_autograd(ops.unpack, unpack_backward, setup_context=unpack_setup)


class _Pack(torch.autograd.Function):
    """The eager pack over a backend's launchers: with ``total_tokens`` None the layout too, else rows only."""

    @staticmethod
    def forward(ctx, kernels: _Kernels, total_tokens, patch_size, nextline, nextframe, channels_last, tile, *latents):
        _pack_setup(ctx, latents, patch_size, nextline, nextframe, channels_last, tile)
        ctx.kernels = kernels
        if total_tokens is not None:
            return kernels.pack_rows(list(latents), patch_size, nextline, nextframe, channels_last, total_tokens, tile)
        out = kernels.pack_layout(list(latents), patch_size, nextline, nextframe, channels_last, tile)
        ctx.mark_non_differentiable(*out[1:])
        return tuple(out)

    @staticmethod
    def backward(ctx, grad, *_int_grads):
        unpack_fn = lambda *args: _Unpack.apply(ctx.kernels, *args)
        return (None,) * 7 + tuple(_pack_grads(ctx, grad, unpack_fn))


class _Unpack(torch.autograd.Function):
    """The eager unpack over a backend's launchers."""

    @staticmethod
    def forward(
        ctx, kernels: _Kernels, tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last, tile
    ):
        outs = kernels.unpack(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last, tile)
        _unpack_setup(ctx, tokens, outs, patch_size, nextline, nextframe, channels_last, tile)
        ctx.kernels = kernels
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        def pack_rows_fn(latents, patch_size, nextline, nextframe, channels_last, total_tokens, tile):
            flags = (patch_size, nextline, nextframe, channels_last, tile)
            return _Pack.apply(ctx.kernels, total_tokens, *flags, *latents)

        return None, _unpack_grad(ctx, grads, pack_rows_fn), None, None, None, None, None, None, None


def _needs_grad(tensors: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _backend(eager: _Kernels, compiled: _Kernels) -> tuple[Callable, Callable]:
    """(pack, unpack) implementations running ``compiled``'s ops under torch.compile, else ``eager``'s launchers
    (under the autograd Functions when a gradient is recorded)."""

    def pack_impl(latents, patch_size, nextline, nextframe, channels_last, tile=None) -> Packed:
        flags = (patch_size, nextline, nextframe, channels_last, list(tile or RASTER))
        if torch.compiler.is_compiling():
            out = compiled.pack_layout(latents, *flags)
        elif _needs_grad(latents):
            out = _Pack.apply(eager, None, *flags, *latents)
        else:
            out = eager.pack_layout(latents, *flags)
        patches, positions, kind, patch_rows, cu_seqlens = out
        shapes = [tuple(x.shape) for x in latents]
        max_len = max(item_tokens(s, patch_size, nextline, nextframe) for s in shapes)
        tiles = None if tile is None else tile_layout(shapes, patch_size, nextline, nextframe, tile, patches.device)
        return Packed(
            patches, cu_seqlens, max_len, positions, kind, shapes, patch_size, nextline, nextframe, patch_rows, tile,
            tiles,
        )  # fmt: skip

    def unpack_impl(tokens, packed: Packed, out_channels, channels_last) -> list[torch.Tensor]:
        args = (tokens, item_shapes(packed.shapes), packed.patch_size, out_channels, packed.nextline,
                packed.nextframe, channels_last, list(packed.tile or RASTER))  # fmt: skip
        if torch.compiler.is_compiling():
            return list(compiled.unpack(*args))
        if _needs_grad([tokens]):
            return list(_Unpack.apply(eager, *args))
        return list(eager.unpack(*args))

    return pack_impl, unpack_impl


# ------------------------------------------------------------------------------------------------------------
# Triton: the launchers of flagdit_kernels/triton/packing.py (imported on first use) and their custom ops.


def _triton_pack_layout(
    latents: list[torch.Tensor],
    patch_size: int,
    nextline: bool,
    nextframe: bool,
    channels_last: bool,
    tile: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import packing as tk

    fhw = [frames_hw(tuple(x.shape)) for x in latents]
    return tk.pack(latents, fhw, patch_size, nextline, nextframe, channels_last, tile, with_layout=True)


def _triton_pack_rows(
    latents: list[torch.Tensor],
    patch_size: int,
    nextline: bool,
    nextframe: bool,
    channels_last: bool,
    total_tokens: int,
    tile: list[int],
) -> torch.Tensor:
    from ..triton import packing as tk

    fhw = [frames_hw(tuple(x.shape)) for x in latents]
    return tk.pack(latents, fhw, patch_size, nextline, nextframe, channels_last, tile, with_layout=False)


def _triton_unpack(
    tokens: torch.Tensor,
    item_shapes: list[int],
    patch_size: int,
    channels: int,
    nextline: bool,
    nextframe: bool,
    channels_last: bool,
    tile: list[int],
) -> list[torch.Tensor]:
    from ..triton import packing as tk

    return tk.unpack(tokens, item_shapes, patch_size, channels, nextline, nextframe, channels_last, tile)


_TRITON = _Kernels(_triton_pack_layout, _triton_pack_rows, _triton_unpack)
_TRITON_OPS = _Kernels(
    torch.library.custom_op("flagdit_kernels::triton_pack_layout", _triton_pack_layout, mutates_args=()),
    torch.library.custom_op("flagdit_kernels::triton_pack_patches", _triton_pack_rows, mutates_args=()),
    torch.library.custom_op("flagdit_kernels::triton_unpack_patches", _triton_unpack, mutates_args=()),
)
_register_compile_path(_TRITON_OPS)
_pack_triton, _unpack_triton = _backend(_TRITON, _TRITON_OPS)

_dispatch.register("pack", "reference", ref.pack, devices=("cpu", "cuda"))
_dispatch.register("unpack", "reference", ref.unpack, devices=("cpu", "cuda"))
_dispatch.register("pack", "triton", _pack_triton, **_dispatch.TRITON)
_dispatch.register("unpack", "triton", _unpack_triton, **_dispatch.TRITON)

# ------------------------------------------------------------------------------------------------------------
# The compiled extension: one set of ops (csrc/bindings.cpp) with CPU and, in a CUDA build, CUDA kernels.
# Without the extension the backends stay registered, so that asking for them says why they cannot run.

_COMPILED = None
if extension() is not None:
    _ops = torch.ops.flagdit_kernels
    _COMPILED = _Kernels(_ops.pack_patches_layout.default, _ops.pack_patches.default, _ops.unpack_patches.default)
    _register_compile_path(_COMPILED)
_pack_compiled, _unpack_compiled = _backend(_COMPILED, _COMPILED)
for _device in ("cpu", "cuda"):
    _missing = lambda cuda=_device == "cuda": extension_missing(cuda=cuda)
    _dispatch.register("pack", _device, _pack_compiled, devices=(_device,), missing=_missing)
    _dispatch.register("unpack", _device, _unpack_compiled, devices=(_device,), missing=_missing)
