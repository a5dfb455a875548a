"""The CUDA pack/unpack kernels (csrc/packing_kernels.cuh), run unchanged on the CPU under a thread-level
emulation (tests/support/cuda_emulation/emulate_packing.cpp: std::threads per block, a real barrier for
__syncthreads, NaN-poisoned shared memory), against the reference. This checks the kernels' indexing,
tiling, placeholder handling and layout outputs where no GPU is available; the at::Tensor glue in
csrc/packing_cuda.cu is exercised only by the GPU tests in test_packing_kernels.py.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from support.cxx_shim import build_shim
from support.helpers import fresh

from flagdit_kernels import reference as ref
from flagdit_kernels.reference.packing import frames_hw, item_tokens

C = 3
MIXED = [(C, 8, 12), (C, 12, 4), (C, 5, 6, 4), (C, 2, 2), (C, 20, 16), (C, 6, 6)]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_shim(tmp_path_factory, "emulate_packing.cpp")


def _i64(values) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _batch_args(latents, element_size, channels, p, nextline, nextframe, channels_last, tile) -> tuple:
    """The arguments emu_pack and emu_unpack share: element size, the latents' item table (count, (F, H, W),
    (C, F, H, W) strides, addresses), channels, patch size, the layout flags and the tile (None: raster)."""
    fhw = [v for x in latents for v in frames_hw(tuple(x.shape))]
    strides = [v for x in latents for v in (x.stride() if x.dim() == 4 else (x.stride(0), 0, *x.stride()[1:]))]
    return (
        ctypes.c_int64(element_size),
        ctypes.c_int64(len(latents)),
        _i64(fhw),
        _i64(strides),
        _i64([x.data_ptr() for x in latents]),
        ctypes.c_int64(channels),
        ctypes.c_int64(p),
        int(nextline),
        int(nextframe),
        int(channels_last),
        _i64(tile or (0, 0, 0)),
    )


def emulated_pack(emu, latents, p, nextline=True, nextframe=True, channels_last=False, vec_used=None, tile=None):
    x0 = latents[0]
    shapes = [tuple(x.shape) for x in latents]
    total = sum(item_tokens(s, p, nextline, nextframe) for s in shapes)
    n_patches = sum(frames_hw(s)[0] * (frames_hw(s)[1] // p) * (frames_hw(s)[2] // p) for s in shapes)
    nan = float("nan")
    out = torch.full((total, x0.shape[0] * p * p), nan, dtype=x0.dtype)
    positions = torch.full((total, 3), -7, dtype=torch.int32)
    kind = torch.full((total,), -7, dtype=torch.int8)
    patch_rows = torch.full((n_patches,), -7, dtype=torch.int64)
    cu = torch.full((len(latents) + 1,), -7, dtype=torch.int32)
    vec = ctypes.c_int(0)
    got = emu.emu_pack(
        *_batch_args(latents, x0.element_size(), x0.shape[0], p, nextline, nextframe, channels_last, tile),
        1,
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_int64(out.stride(0)),
        ctypes.c_void_p(positions.data_ptr()),
        ctypes.c_void_p(kind.data_ptr()),
        ctypes.c_void_p(patch_rows.data_ptr()),
        ctypes.c_void_p(cu.data_ptr()),
        ctypes.byref(vec),
    )
    assert got == total
    if vec_used is not None:
        vec_used.append(vec.value)
    return out, positions, kind, patch_rows, cu


def emulated_unpack(
    emu, tokens, shapes, p, channels, nextline=True, nextframe=True, channels_last=True, vec_used=None, tile=None
):
    nan = float("nan")
    outs = [
        torch.full((channels, *s[1:]), nan, dtype=tokens.dtype) for s in shapes
    ]  # contiguous, like the CUDA op's outputs
    vec = ctypes.c_int(0)
    got = emu.emu_unpack(
        *_batch_args(outs, tokens.element_size(), channels, p, nextline, nextframe, channels_last, tile),
        ctypes.c_void_p(tokens.data_ptr()),
        ctypes.c_int64(tokens.stride(0)),
        ctypes.c_int64(tokens.stride(1)),
        ctypes.byref(vec),
    )
    assert got == tokens.shape[0]
    if vec_used is not None:
        vec_used.append(vec.value)
    return outs


def _check_pack(emu, latents, p, nextline=True, nextframe=True, channels_last=False, vec_used=None, tile=None):
    out, positions, kind, patch_rows, cu = emulated_pack(
        emu, latents, p, nextline, nextframe, channels_last, vec_used, tile
    )
    want = ref.pack([x.contiguous() for x in latents], p, nextline, nextframe, channels_last, tile)
    assert torch.equal(out, want.patches)
    assert torch.equal(positions, want.positions)
    assert torch.equal(kind, want.kind)
    assert torch.equal(patch_rows, want.patch_rows)
    assert torch.equal(cu, want.cu_seqlens)
    return want


@pytest.mark.parametrize(("nextline", "nextframe"), [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_emulated_pack_unpack_mixed(emu, nextline, nextframe, channels_last):
    latents = [fresh(s, torch.float32, seed=i) for i, s in enumerate(MIXED)]
    want = _check_pack(emu, latents, 2, nextline, nextframe, channels_last)
    tokens = fresh((want.kind.shape[0], 4 * 5), torch.float32, seed=9)
    outs = emulated_unpack(emu, tokens, want.shapes, 2, 5, nextline, nextframe, channels_last)
    for o, w in zip(outs, ref.unpack(tokens, want, 5, channels_last)):
        assert torch.equal(o, w)


@pytest.mark.parametrize(("nextline", "nextframe"), [(True, True), (False, False), (False, True)])
@pytest.mark.parametrize("tile", [(1, 1, 1), (2, 3, 2), (4, 16, 16)], ids=str)
def test_emulated_tile_major_pack_unpack(emu, nextline, nextframe, tile):
    """Tile-major order (edge tiles partial, a tile bigger than the items): the kernels unchanged, only the
    token index of each patch and slot differs; vector path included (16 channels, aligned)."""
    for channels, channels_last in ((C, False), (16, True)):
        latents = [fresh((channels, *s[1:]), torch.float32, seed=80 + i) for i, s in enumerate(MIXED)]
        want = _check_pack(emu, latents, 2, nextline, nextframe, channels_last, tile=tile)
        outs = emulated_unpack(emu, want.patches, want.shapes, 2, channels, nextline, nextframe, channels_last,
                               tile=tile)  # fmt: skip
        assert all(torch.equal(o, x) for o, x in zip(outs, latents))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_emulated_dtypes_round_trip(emu, dtype):
    latents = [fresh(s, dtype, seed=20 + i) for i, s in enumerate(MIXED)]
    want = _check_pack(emu, latents, 2)
    outs = emulated_unpack(emu, want.patches, want.shapes, 2, C, channels_last=False)
    assert all(torch.equal(o, x) for o, x in zip(outs, latents))


@pytest.mark.parametrize(
    ("p", "shapes"),
    [
        (1, [(5, 3, 7), (5, 2, 1, 4), (5, 1, 1)]),
        (3, [(2, 6, 9), (2, 3, 3, 6), (2, 3, 3)]),
        (4, [(3, 8, 4), (3, 4, 12)]),
        (2, [(150, 4, 6), (150, 2, 2, 2)]),  # several channel blocks
        (1, [(4, 40, 40)]),  # several token blocks for one item
    ],
)
def test_emulated_patch_sizes_and_blocks(emu, p, shapes):
    latents = [fresh(s, torch.float32, seed=30 + i) for i, s in enumerate(shapes)]
    for channels_last in (False, True):
        want = _check_pack(emu, latents, p, channels_last=channels_last)
        outs = emulated_unpack(emu, want.patches, want.shapes, p, shapes[0][0], channels_last=channels_last)
        assert all(torch.equal(o, x) for o, x in zip(outs, latents))


def test_emulated_strided_inputs(emu):
    latents = [
        fresh((C, 12, 8), torch.float32, seed=40).transpose(1, 2),
        fresh((C, 6, 13), torch.float32, seed=41)[:, :, 1:11],
        fresh((5, C, 4, 6), torch.float32, seed=42).permute(1, 0, 2, 3),
        fresh((C, 8, 6), torch.float32, seed=43)[:, ::2, :],
    ]
    for channels_last in (False, True):
        want = _check_pack(emu, latents, 2, channels_last=channels_last)
    wide = fresh((want.kind.shape[0], 4 * C + 5), torch.float32, seed=44)
    tokens = wide[:, 2 : 2 + 4 * C]
    outs = emulated_unpack(emu, tokens, want.shapes, 2, C)
    for o, w in zip(outs, ref.unpack(tokens.contiguous(), want, C)):
        assert torch.equal(o, w)


@pytest.mark.parametrize("channels_last", [False, True])
def test_emulated_power_of_two_channels_and_column_strided_tokens(emu, channels_last):
    latents = [fresh((16, *s[1:]), torch.float32, seed=50 + i) for i, s in enumerate(MIXED[:4])]
    want = _check_pack(emu, latents, 2, channels_last=channels_last)
    tokens = fresh((4 * 16, want.kind.shape[0]), torch.float32, seed=55).t()  # column stride T
    outs = emulated_unpack(emu, tokens, want.shapes, 2, 16, channels_last=channels_last)
    for o, w in zip(outs, ref.unpack(tokens.contiguous(), want, 16, channels_last)):
        assert torch.equal(o, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_emulated_vector_path(emu, dtype, channels_last):
    """Aligned latents and token rows take the 16-byte path (rows wider than a segment, several rows per segment
    and partial segments included); one misaligned item sends the batch back to single words, still exact."""
    shapes = [(16, 8, 48), (16, 3, 6, 16), (16, 40, 8)]
    latents = [fresh(s, dtype, seed=60 + i) for i, s in enumerate(shapes)]
    used = []
    want = _check_pack(emu, latents, 2, channels_last=channels_last, vec_used=used)
    outs = emulated_unpack(emu, want.patches, want.shapes, 2, 16, channels_last=channels_last, vec_used=used)
    assert all(torch.equal(o, x) for o, x in zip(outs, latents))
    assert used == [16 // latents[0].element_size()] * 2
    odd = fresh((16, 8, 50), dtype, seed=70)[:, :, 1:49]  # W stride 1, but a base that is not 16-byte aligned
    used = []
    want = _check_pack(emu, [*latents, odd], 2, channels_last=channels_last, vec_used=used)
    tokens = fresh((want.kind.shape[0], 64 + 1), dtype, seed=71)[:, 1:]  # misaligned token rows
    outs = emulated_unpack(emu, tokens, want.shapes, 2, 16, channels_last=channels_last, vec_used=used)
    for o, w in zip(outs, ref.unpack(tokens.contiguous(), want, 16, channels_last)):
        assert torch.equal(o, w)
    assert used == [1, 1]
