"""Tile-sparse attention's description (``fk.TileSparsity``), its block lists (``fk.tile_sparse_blocks``) and
its masked reference (``fk.tile_sparse_attention``), against masks and attention built here by brute force from
the token positions alone (python loops over tokens, no tile tables)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from support.helpers import fresh

import flagdit_kernels as fk
from flagdit_kernels import reference as ref
from flagdit_kernels.reference.packing import PATCH
from flagdit_kernels.reference.rope import rotate
from flagdit_kernels.reference.tile_sparsity import tile_sparse_mask

P = 2
C = 3
# Videos of 5 and 3 frames mixed with images of different aspect ratios, and a one-patch image.
MIXED = [(C, 8, 12), (C, 5, 6, 8), (C, P, P), (C, 3, 10, 14)]
TILE = (2, 2, 3)


def _pack(nextline=True, nextframe=True, shapes=MIXED, tile=TILE):
    latents = [fresh(s, torch.float64, seed=i) for i, s in enumerate(shapes)]
    return ref.pack(latents, P, nextline, nextframe, tile=tile)


def _brute_force_window_mask(packed, window) -> torch.Tensor:
    """(T, T): STA over tile coordinates computed from each token's position, placeholders global."""
    tile = packed.tile
    cu = packed.cu_seqlens.tolist()
    n = cu[-1]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for b in range(len(cu) - 1):
        rows = range(cu[b], cu[b + 1])
        pos = packed.positions.tolist()
        patch = [packed.kind[i].item() == PATCH for i in range(n)]
        coords = {i: tuple(pos[i][a] // tile[a] for a in range(3)) for i in rows if patch[i]}
        grid = [max(c[a] for c in coords.values()) + 1 for a in range(3)]
        starts = {}
        for i, c in coords.items():
            # centred, then shifted inside the grid
            starts[i] = [max(0, min(c[a] - window[a] // 2, grid[a] - window[a])) for a in range(3)]
        for i in rows:
            for j in rows:
                if not (patch[i] and patch[j]):
                    mask[i, j] = True
                else:
                    mask[i, j] = all(starts[i][a] <= coords[j][a] < starts[i][a] + window[a] for a in range(3))
    return mask


def _brute_force_top_k_mask(packed, q, k, top_k, scale) -> torch.Tensor:
    """(H, T, T): per head, the top_k key tiles by the score of the tile-mean query against the tile-mean key
    (tiles found by grouping tokens on (sample, position // tile)), placeholders global."""
    tile, cu = packed.tile, packed.cu_seqlens.tolist()
    n, heads = cu[-1], q.shape[1]
    group = heads // k.shape[1]
    mask = torch.zeros(heads, n, n, dtype=torch.bool)
    pos = packed.positions.tolist()
    for b in range(len(cu) - 1):
        rows = list(range(cu[b], cu[b + 1]))
        members: dict[tuple, list[int]] = {}
        for i in rows:
            if packed.kind[i].item() == PATCH:
                members.setdefault(tuple(pos[i][a] // tile[a] for a in range(3)), []).append(i)
        names = sorted(members)
        for h in range(heads):
            qm = torch.stack([q[members[t], h].mean(0) for t in names])
            km = torch.stack([k[members[t], h // group].mean(0) for t in names])
            chosen = (qm @ km.T * scale).topk(min(top_k, len(names)), dim=-1).indices
            for qi, t in enumerate(names):
                keys = [j for c in chosen[qi].tolist() for j in members[names[c]]]
                for i in members[t]:
                    mask[h, i, keys] = True
        slots = [i for i in rows if packed.kind[i].item() != PATCH]
        mask[:, slots, cu[b] : cu[b + 1]] = True
        mask[:, cu[b] : cu[b + 1], slots] = True
    return mask


def _masked_attention(q, k, v, cu, mask, scale):
    """Dense float64 attention per sample with a (H, T, T) mask (sample blocks only)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = []
    for s, e in pairwise(cu):
        scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale
        scores = scores.masked_fill(~mask[:, s:e, s:e], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e]))
    return torch.cat(out)


def _qkv(packed, heads=4, kv_heads=2, head_dim=8, seed=50):
    t = packed.kind.shape[0]
    return (
        fresh((t, heads, head_dim), torch.float64, seed=seed),
        fresh((t, kv_heads, head_dim), torch.float64, seed=seed + 1),
        fresh((t, kv_heads, head_dim), torch.float64, seed=seed + 2),
    )


@pytest.mark.parametrize("window", [(1, 1, 1), (3, 3, 3), (1, 2, 5), (9, 9, 9)], ids=str)
@pytest.mark.parametrize(("nextline", "nextframe"), [(True, True), (False, False)])
def test_window_mask_matches_brute_force(window, nextline, nextframe):
    packed = _pack(nextline, nextframe)
    q, k, _ = _qkv(packed)
    blocks = fk.tile_sparse_blocks(q, k, packed.cu_seqlens, packed.tiles, fk.TileSparsity(window=window))
    mask = tile_sparse_mask(packed.tiles, packed.cu_seqlens, blocks)
    want = _brute_force_window_mask(packed, window)
    assert blocks.keys.shape[0] == 1 and torch.equal(mask[0], want)
    assert torch.isclose(blocks.density.double(), want.double().sum() / (packed.cu_seqlens.diff() ** 2).sum())
    # ascending valid keys first, -1 after them
    keys, counts = blocks.keys[0], blocks.counts[0]
    for row, c in zip(keys.tolist(), counts.tolist()):
        assert row[:c] == sorted(set(row[:c])) and all(x == -1 for x in row[c:])


@pytest.mark.parametrize("top_k", [1, 3, 50])
def test_top_k_mask_matches_brute_force(top_k):
    packed = _pack()
    q, k, _ = _qkv(packed, seed=60)
    scale = 0.3
    blocks = fk.tile_sparse_blocks(q, k, packed.cu_seqlens, packed.tiles, fk.TileSparsity(top_k=top_k), scale)
    mask = tile_sparse_mask(packed.tiles, packed.cu_seqlens, blocks)
    want = _brute_force_top_k_mask(packed, q, k, top_k, scale)
    assert blocks.keys.shape[0] == q.shape[1] and torch.equal(mask, want)
    dense = (packed.cu_seqlens.diff() ** 2).sum()
    assert torch.isclose(blocks.density.double(), want.double().sum((1, 2)).mean() / dense)
    if top_k == 50:  # more than any sample's tiles: dense
        assert torch.equal(mask, _brute_force_window_mask(packed, (99, 99, 99)).expand_as(mask))


def test_union_of_window_and_top_k():
    packed = _pack()
    q, k, _ = _qkv(packed, seed=70)
    both = fk.TileSparsity(window=(1, 1, 1), top_k=2)
    mask = tile_sparse_mask(
        packed.tiles, packed.cu_seqlens, fk.tile_sparse_blocks(q, k, packed.cu_seqlens, packed.tiles, both)
    )
    scale = 1 / math.sqrt(q.shape[-1])
    want = _brute_force_window_mask(packed, (1, 1, 1)) | _brute_force_top_k_mask(packed, q, k, 2, scale)
    assert torch.equal(mask, want)


@pytest.mark.parametrize("sparsity", [fk.TileSparsity(window=(3, 1, 3)), fk.TileSparsity(top_k=2)], ids=str)
def test_sparse_attention_matches_masked_dense_forward_and_backward(sparsity):
    """float64, GQA, RoPE from the packed positions and the dense gated text branch."""
    packed = _pack()
    q, k, v = (x.requires_grad_() for x in _qkv(packed, seed=80))
    text_k = fresh((6, 2, 8), torch.float64, seed=84).requires_grad_()
    text_v = fresh((6, 2, 8), torch.float64, seed=85).requires_grad_()
    text_cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    gate = fresh((4,), torch.float64, seed=86).requires_grad_()
    freqs = fk.rope_freqs(8, packed.positions, axes_dims=(2, 2, 4), theta=100.0)
    text = dict(text_k=text_k, text_v=text_v, text_cu_seqlens=text_cu, gate=gate)
    out, blocks = fk.tile_sparse_attention(q, k, v, packed.cu_seqlens, packed.tiles, sparsity, freqs=freqs, **text)

    inputs = (q, k, v, text_k, text_v, gate)
    copies = [x.detach().clone().requires_grad_() for x in inputs]
    qr, kr = (rotate(x, freqs, interleaved=True) for x in copies[:2])
    scale = 1 / math.sqrt(8)
    if sparsity.window is not None:
        mask = _brute_force_window_mask(packed, sparsity.window).expand(4, -1, -1)
    else:
        mask = _brute_force_top_k_mask(packed, qr.detach(), kr.detach(), sparsity.top_k, scale)
    cu = packed.cu_seqlens.tolist()
    want = _masked_attention(qr, kr, copies[2], cu, mask, scale)
    text_out = ref.varlen_attention(
        qr,
        kr,
        copies[2],
        packed.cu_seqlens,
        packed.max_seqlen,
        text_k=copies[3],
        text_v=copies[4],
        text_cu_seqlens=text_cu,
        gate=copies[5],
    ) - ref.varlen_attention(qr, kr, copies[2], packed.cu_seqlens, packed.max_seqlen)  # the text branch alone
    want = want + text_out
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert 0 < blocks.density.item() < 1
    upstream = fresh(out.shape, torch.float64, seed=87)
    out.backward(upstream)
    want.backward(upstream)
    for name, a, b in zip(("q", "k", "v", "text_k", "text_v", "gate"), inputs, copies):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_sparse_equals_dense_when_the_window_covers_every_tile():
    packed = _pack()
    q, k, v = _qkv(packed, seed=90)
    out, blocks = fk.tile_sparse_attention(q, k, v, packed.cu_seqlens, packed.tiles, fk.TileSparsity(window=(9, 9, 9)))
    torch.testing.assert_close(out, ref.varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen))
    assert blocks.density.item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "window"),
        ({"window": (0, 1, 1)}, ValueError, r"window\[0\]"),
        ({"window": (1, 1)}, ValueError, "window"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 2.5}, ValueError, "top_k"),
    ],
)
def test_bad_sparsity_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fk.TileSparsity(**kwargs)


def test_bad_arguments_are_refused():
    packed = _pack()
    q, k, v = _qkv(packed)
    sparsity = fk.TileSparsity(window=(1, 1, 1))
    with pytest.raises(TypeError, match="sparsity"):
        fk.tile_sparse_blocks(q, k, packed.cu_seqlens, packed.tiles, (1, 1, 1))
    with pytest.raises(TypeError, match="tile-major"):
        fk.tile_sparse_blocks(q, k, packed.cu_seqlens, ref.pack([torch.randn(3, 4, 4)], 2).tiles, sparsity)
    with pytest.raises(ValueError, match="tokens"):
        fk.tile_sparse_blocks(q[1:], k, packed.cu_seqlens, packed.tiles, sparsity)
    with pytest.raises(ValueError, match="heads"):
        fk.tile_sparse_blocks(q[:, :3], k, packed.cu_seqlens, packed.tiles, sparsity)
    with pytest.raises(ValueError, match="v must"):
        fk.tile_sparse_attention(q, k, v[:, :1], packed.cu_seqlens, packed.tiles, sparsity)


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on anything that reads a tensor's values into Python or sizes an output by its values (each a
    device-to-host sync on a GPU): item/tolist/bool/int/float, nonzero, boolean-mask indexing."""

    SYNCING = frozenset(
        {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select", "unique"}
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        assert name not in self.SYNCING, f"host read: {name}"
        if name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            assert not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index), "boolean index"
        return func(*args, **(kwargs or {}))


def test_block_lists_are_built_without_reading_values_on_the_host():
    packed = _pack()
    q, k, _ = _qkv(packed, seed=95)
    with _NoHostReads():
        blocks = fk.tile_sparse_blocks(
            q, k, packed.cu_seqlens, packed.tiles, fk.TileSparsity(window=(3, 3, 3), top_k=2)
        )
    assert blocks.counts.min() >= 1  # every query tile lists at least itself or its best key tile
