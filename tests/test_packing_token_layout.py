"""The token layout is stated once in C++ (csrc/token_layout.h, used by the CPU and CUDA pack/unpack) and once
in Triton (flagdit_kernels/triton/packing.py: ``token_index`` and the placeholder slots); here both are checked
against each other and against the reference (flagdit_kernels/reference/packing.py) on odd geometries: kinds,
(frame, row, col) positions of patches and placeholders, and the patch order.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from support.cxx_shim import build_shim
from support.helpers import INTERPRETED, ON_GPU, fresh

from flagdit_kernels.reference.packing import NEXTFRAME, NEXTLINE, PATCH, _item_layout, item_tokens

# (frames, height, width, patch size, nextline, nextframe)
GEOMETRIES = [
    (1, 4, 6, 2, True, True),
    (3, 4, 4, 2, True, True),
    (2, 6, 9, 3, False, True),
    (5, 2, 2, 1, True, False),
    (1, 2, 2, 2, False, False),
    (4, 8, 2, 2, True, True),
    (2, 16, 40, 2, True, True),  # several column tiles per row in the Triton kernels
]


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return build_shim(tmp_path_factory, "token_layout_shim.cpp")


def cpp_layout(shim, f, h, w, p, nextline, nextframe, tile=(0, 0, 0)):
    """(kind, positions, patch index) of every token of one item, from token_layout.h (tile-major for a
    positive ``tile``); the shim also checks that token_index() inverts locate() on every token."""
    n = item_tokens((1, f, h, w), p, nextline, nextframe)
    kind = torch.empty(n, dtype=torch.int8)
    positions = torch.empty(n, 3, dtype=torch.int64)
    patch = torch.empty(n, dtype=torch.int64)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())
    args = [ctypes.c_int64(v) for v in (f, h, w, p)] + [ctypes.c_int(nextline), ctypes.c_int(nextframe)]
    args += [ctypes.c_int64(t) for t in tile]
    assert shim.item_layout(*args, ptr(kind), ptr(positions), ptr(patch)) == n
    return kind, positions, patch


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_cpp_layout_matches_reference(shim, geometry):
    f, h, w, p, nextline, nextframe = geometry
    kind, positions, patch = cpp_layout(shim, *geometry)
    want_positions, want_kind, _ = _item_layout((1, f, h, w), p, nextline, nextframe)
    assert torch.equal(kind.long(), want_kind.long())
    assert torch.equal(positions, want_positions.long())
    is_patch = kind == PATCH
    assert torch.equal(patch[is_patch], torch.arange(f * (h // p) * (w // p)))  # patches in row-major order
    assert set(kind.tolist()) <= {PATCH, NEXTLINE, NEXTFRAME}


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("tile", [(1, 1, 1), (2, 2, 3), (2, 3, 2), (8, 8, 64)], ids=str)
def test_cpp_tile_major_layout_matches_reference(shim, geometry, tile):
    f, h, w, p, nextline, nextframe = geometry
    kind, positions, patch = cpp_layout(shim, *geometry, tile)
    want_positions, want_kind, want_patch_tokens = _item_layout((1, f, h, w), p, nextline, nextframe, tile)
    assert torch.equal(kind.long(), want_kind.long())
    assert torch.equal(positions, want_positions.long())
    is_patch = kind == PATCH
    assert torch.equal(torch.nonzero(is_patch).flatten()[patch[is_patch].argsort()], want_patch_tokens)


@pytest.mark.skipif(not (INTERPRETED or ON_GPU), reason="triton runs only on a GPU or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("tile", [(0, 0, 0), (2, 3, 5)], ids=str)
def test_triton_twin_matches_cpp(shim, channels_last, tile):
    """The Triton pack kernel's layout outputs (its twin of token_layout.h) for several items in one batch; 64
    channels make its segments 16 patches wide, so the widest item's rows span two column tiles."""
    from flagdit_kernels.triton import packing as kernels

    latents = [fresh((64, f, h, w) if f > 1 else (64, h, w), torch.float32, seed=i) for i, (f, h, w, *_) in
               enumerate(g for g in GEOMETRIES if g[3] == 2 and g[4] and g[5])]  # fmt: skip
    fhw = [(x.shape[1], x.shape[2], x.shape[3]) if x.dim() == 4 else (1, x.shape[1], x.shape[2]) for x in latents]
    _, positions, kind, patch_rows, cu = kernels.pack(
        latents, fhw, 2, True, True, channels_last, [t for t in tile if t], with_layout=True
    )
    patches_before = 0
    for i, (f, h, w) in enumerate(fhw):
        want_kind, want_positions, want_patch = cpp_layout(shim, f, h, w, 2, True, True, tile)
        start, end = int(cu[i]), int(cu[i + 1])
        assert end - start == want_kind.numel()
        assert torch.equal(kind[start:end].cpu(), want_kind)
        assert torch.equal(positions[start:end].long().cpu(), want_positions)
        n_patches = f * (h // 2) * (w // 2)
        rows = patch_rows[patches_before : patches_before + n_patches].cpu() - start
        assert torch.equal(want_patch[rows], torch.arange(n_patches))
        patches_before += n_patches
