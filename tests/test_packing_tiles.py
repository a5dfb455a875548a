"""Tile-major packing (``fk.pack(..., tile=(tt, th, tw))``): the order against a brute-force statement of it,
every backend against the reference exactly (forward, backward, round trip), the tile table, the argument
checks, and dense attention on a tile-major pack equal to dense attention on the raster pack."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from support.helpers import DEVICE, INTERPRETED, ON_GPU, backend_params, fresh, poisoned_allocations

import flagdit_kernels as fk
from flagdit_kernels import reference as ref
from flagdit_kernels.reference.packing import PATCH, frames_hw

P = 2
C = 3
# Images of different aspect ratios mixed with videos (5 and 3 frames), a one-patch item, a wide item.
MIXED = [(C, 8, 12), (C, 12, 4), (C, 5, 6, 4), (C, P, P), (C, 3, 10, 14), (C, 6, 6)]
# Tiles with partial edge tiles, one-patch tiles, a tile bigger than every item, a time-only tile.
TILES = [(2, 2, 3), (1, 1, 1), (3, 2, 2), (8, 16, 16), (4, 1, 7)]
FLAGS = [(True, True), (False, False), (True, False), (False, True)]
PACK_BACKENDS = backend_params("pack", reference=False)


def _latents(shapes=MIXED, dtype=torch.float32, seed=0):
    return [fresh(s, dtype, seed=seed + i) for i, s in enumerate(shapes)]


def _brute_force_order(shape, tile):
    """(frame, row, col) of an item's patches, tile-major, sorted by a python key (tile first, then raster)."""
    f, h, w = frames_hw(shape)
    cells = [(a, r, c) for a in range(f) for r in range(h // P) for c in range(w // P)]
    return sorted(cells, key=lambda x: (x[0] // tile[0], x[1] // tile[1], x[2] // tile[2], *x))


@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize(("nextline", "nextframe"), FLAGS)
def test_reference_order_is_tile_major_with_positions_kept(tile, nextline, nextframe):
    latents = _latents()
    raster = ref.pack(latents, P, nextline, nextframe)
    tiled = ref.pack(latents, P, nextline, nextframe, tile=tile)
    assert torch.equal(tiled.cu_seqlens, raster.cu_seqlens) and tiled.max_seqlen == raster.max_seqlen
    cu = tiled.cu_seqlens.tolist()
    for b, shape in enumerate(MIXED):
        pos, kind = tiled.positions[cu[b] : cu[b + 1]], tiled.kind[cu[b] : cu[b + 1]]
        n = len(_brute_force_order(shape, tile))
        assert (kind[:n] == PATCH).all() and (kind[n:] != PATCH).all()  # patches first, then the slots
        assert [tuple(p) for p in pos[:n].tolist()] == _brute_force_order(shape, tile)
        raster_slots = raster.kind[cu[b] : cu[b + 1]] != PATCH
        assert torch.equal(kind[n:], raster.kind[cu[b] : cu[b + 1]][raster_slots])  # slots in raster order
        assert torch.equal(pos[n:], raster.positions[cu[b] : cu[b + 1]][raster_slots])
    # Every token carries the same vector as the raster token at its (sample, position).
    sample = torch.arange(len(MIXED)).repeat_interleave(tiled.cu_seqlens.diff().long())
    keys = lambda packed: [(b, *p) for b, p in zip(sample.tolist(), packed.positions.tolist())]
    raster_row = {k: i for i, k in enumerate(keys(raster))}
    order = torch.tensor([raster_row[k] for k in keys(tiled)])
    assert torch.equal(tiled.patches, raster.patches[order])
    assert torch.equal(tiled.patches.index_select(0, tiled.patch_rows), raster.patches[raster.patch_rows])


@pytest.mark.parametrize("tile", TILES, ids=str)
def test_tile_layout_describes_the_tiles(tile):
    packed = ref.pack(_latents(), P, tile=tile)
    t = packed.tiles
    assert packed.tile == tile and t.tile == tile
    cu, pos = packed.cu_seqlens.tolist(), packed.positions.long()
    tiles_seen = 0
    for b, shape in enumerate(MIXED):
        f, h, w = frames_hw(shape)
        grid = (-(-f // tile[0]), -(-(h // P) // tile[1]), -(-(w // P) // tile[2]))
        assert tuple(t.grid[b].tolist()) == grid
        first, last = t.cu_tiles[b].item(), t.cu_tiles[b + 1].item()
        assert first == tiles_seen and last - first == grid[0] * grid[1] * grid[2]
        tiles_seen = last
        ranges = t.ranges[first:last].tolist()
        assert ranges[0][0] == cu[b] and ranges[-1][1] == t.patch_end[b].item() == cu[b] + f * (h // P) * (w // P)
        assert all(r0[1] == r1[0] for r0, r1 in pairwise(ranges))  # contiguous, in order
        for j, (start, end) in enumerate(ranges):
            coord = t.coords[first + j].long()
            assert end > start and (pos[start:end] // torch.tensor(tile) == coord).all()
            assert (t.token_tile[start:end] == first + j).all() and (t.sample[first + j] == b).item()
        assert (t.token_tile[t.patch_end[b] : cu[b + 1]] == -1).all()
    assert t.max_tiles == max((t.cu_tiles[1:] - t.cu_tiles[:-1]).tolist())
    raster = ref.pack(_latents(), P)
    assert raster.tile is None and raster.tiles is None


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize("tile", TILES[:4], ids=str)
@pytest.mark.parametrize(("nextline", "nextframe"), FLAGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backends_match_reference_exactly(backend, tile, nextline, nextframe, channels_last):
    latents = _latents()
    want = ref.pack(latents, P, nextline, nextframe, channels_last, tile)
    with poisoned_allocations():
        got = fk.pack(latents, P, nextline, nextframe, channels_last=channels_last, tile=tile, backend=backend)
    for field in ("patches", "positions", "kind", "patch_rows", "cu_seqlens"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    for field in ("grid", "cu_tiles", "ranges", "coords", "sample", "patch_end", "token_tile"):
        assert torch.equal(getattr(got.tiles, field), getattr(want.tiles, field)), field
    tokens = fresh((want.kind.shape[0], P * P * 5), torch.float32, seed=7)
    with poisoned_allocations():
        outs = fk.unpack(tokens, got, 5, channels_last=not channels_last, backend=backend)
    for o, w in zip(outs, ref.unpack(tokens, want, 5, not channels_last)):
        assert torch.equal(o, w)
    back = fk.unpack(got.patches, got, C, channels_last=channels_last, backend=backend)
    assert all(torch.equal(o, x) for o, x in zip(back, latents))


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gradients_match_reference_exactly(backend, dtype):
    tile = (2, 3, 2)
    latents = [x.requires_grad_() for x in _latents(dtype=dtype, seed=20)]
    mine = [x.detach().clone().requires_grad_() for x in latents]
    want = ref.pack(latents, P, tile=tile)
    got = fk.pack(mine, P, tile=tile, backend=backend)
    upstream = fresh(want.patches.shape, dtype, seed=21)
    with poisoned_allocations():
        got.patches.backward(upstream)
    want.patches.backward(upstream)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(mine, latents))
    # unpack's backward: the pack of the latent gradients (zeros at placeholder rows), tile-major.
    tokens = fresh((want.kind.shape[0], P * P * 4), dtype, seed=22).requires_grad_()
    mine_tokens = tokens.detach().clone().requires_grad_()
    outs = fk.unpack(mine_tokens, got, 4, backend=backend)
    want_outs = ref.unpack(tokens, want, 4)
    grads = [fresh(o.shape, dtype, seed=30 + i) for i, o in enumerate(want_outs)]
    with poisoned_allocations():
        torch.autograd.backward(outs, grads)
    torch.autograd.backward(want_outs, grads)
    assert torch.equal(mine_tokens.grad, tokens.grad)
    assert (tokens.grad[want.kind != PATCH] == 0).all()


@pytest.mark.parametrize(
    ("tile", "error"),
    [
        ((0, 2, 2), ValueError),
        ((2, 2), ValueError),
        ((1, -1, 1), ValueError),
        ("222", ValueError),
        ((1.5, 2, 2), ValueError),
        ((True, 2, 2), ValueError),
    ],
)
def test_bad_tiles_are_refused_naming_the_argument(tile, error):
    with pytest.raises(error, match="tile"):
        fk.pack(_latents(), P, tile=tile)


def test_compiled_ops_check_their_tile():
    if "cpu" not in fk.available_backends("pack", "cpu"):
        pytest.skip("no compiled extension")
    ops = torch.ops.flagdit_kernels
    x = [torch.randn(3, 4, 4)]
    with pytest.raises(RuntimeError, match="tile"):
        ops.pack_patches_layout(x, 2, True, True, False, [1, 0, 1])
    with pytest.raises(RuntimeError, match="tile"):
        ops.unpack_patches(torch.randn(6, 12), [3, 1, 4, 4], 2, 3, True, True, False, [2, 2])


def test_packed_with_a_tile_that_disagrees_is_refused():
    packed = ref.pack(_latents(), P, tile=(2, 2, 2))
    packed.tile = (1, 2, 2)
    with pytest.raises(ValueError, match=r"packed\.tile"):
        fk.unpack(packed.patches, packed, C, channels_last=False)


ATTENTION_BACKENDS = ["reference"] + (["triton"] if INTERPRETED or ON_GPU else [])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("tile", [(2, 2, 3), (8, 16, 16)], ids=str)
def test_dense_attention_on_a_tile_major_pack_equals_the_raster_pack(backend, tile):
    """Per-token q, k, v made from the latents (a token-wise map, as the model's projections are), 3-axis RoPE
    from the packed positions, GQA and the gated text branch on: attention then unpack gives the same latents in
    both orders. (A RoPE over the token's index in its sample, Flag-DiT's, must take the raster index from the
    positions instead, or the orders differ.)"""
    heads, kv_heads, head_dim = 4, 2, 16
    latents = [x.to(DEVICE) for x in _latents(seed=40)]
    proj = fresh((C * P * P, (heads + 2 * kv_heads) * head_dim), torch.float32, seed=41)
    text_k = fresh((7, kv_heads, head_dim), torch.float32, seed=42)
    text = dict(
        text_k=text_k,
        text_v=fresh((7, kv_heads, head_dim), torch.float32, seed=43),
        text_cu_seqlens=torch.tensor([0, 2, 2, 3, 5, 7, 7], dtype=torch.int32, device=DEVICE),
        text_max_seqlen=2,
        gate=fresh((heads,), torch.float32, seed=44),
    )
    outs = []
    for order in (None, tile):
        packed = ref.pack(latents, P, tile=order)
        qkv = (packed.patches @ proj).view(-1, heads + 2 * kv_heads, head_dim)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        freqs = fk.rope_freqs(head_dim, packed.positions, axes_dims=(4, 6, 6), theta=256.0)
        o = fk.varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, freqs=freqs, backend=backend, **text)
        outs.append(ref.unpack(o.reshape(o.shape[0], -1), packed, heads * head_dim // (P * P)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (INTERPRETED or ON_GPU), reason="triton runs only on a GPU or under TRITON_INTERPRET=1")
def test_tile_major_pack_compiles_fullgraph():
    """The tile table is built from the shapes (python ints) and device ops only: torch.compile traces the
    tile-major pack, unpack and their backward in one graph."""
    tile = (2, 2, 3)
    latents = _latents(MIXED[:3], seed=60)
    weights = [fresh(x.shape, torch.float32, seed=70 + i) for i, x in enumerate(latents)]

    def step(xs):
        packed = fk.pack(xs, P, tile=tile, backend="triton")
        outs = fk.unpack(packed.patches * 2.0, packed, C, channels_last=False, backend="triton")
        return sum((o * w).sum() for o, w in zip(outs, weights)), packed.positions, packed.tiles.token_tile

    xs = [x.clone().requires_grad_() for x in latents]
    loss, positions, token_tile = torch.compile(step, fullgraph=True, backend="aot_eager")(xs)
    loss.backward()
    want = ref.pack(latents, P, tile=tile)
    assert torch.equal(positions, want.positions) and torch.equal(token_tile, want.tiles.token_tile)
    assert all(torch.equal(x.grad, 2.0 * w) for x, w in zip(xs, weights))
