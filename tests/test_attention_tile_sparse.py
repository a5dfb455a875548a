"""``fk.varlen_attention(..., sparsity=, tiles=)``: tile-sparse self-attention as an argument of the op. The
reference backend against ``fk.tile_sparse_attention`` (itself checked by brute force in
test_attention_tile_sparsity.py), the Triton kernels against the float64 masked reference, the density each call
reports, the kernels' device-built tables, and the argument checks."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from support.helpers import DEVICE, INTERPRETED, ON_GPU, compare_with_reference, force_warp_specialized, fresh

import flagdit_kernels as fk
from flagdit_kernels import reference as ref
from flagdit_kernels.ops import attention as attention_op

P = 2
C = 3
# Videos of 5 and 3 frames mixed with images of different aspect ratios, and a one-patch image.
MIXED = [(C, 8, 12), (C, 5, 6, 8), (C, P, P), (C, 3, 10, 14)]
TILE = (2, 2, 3)
WINDOW = fk.TileSparsity(window=(3, 1, 3))
TOP_K = fk.TileSparsity(top_k=2)


def _pack(shapes=MIXED, tile=TILE):
    latents = [fresh(s, torch.float64, seed=i) for i, s in enumerate(shapes)]
    return ref.pack(latents, P, tile=tile)


def _inputs(packed, dtype=torch.float64, heads=4, kv_heads=2, head_dim=16, seed=0):
    t = packed.kind.shape[0]
    q = fresh((t, heads, head_dim), dtype, seed=seed)
    k = fresh((t, kv_heads, head_dim), dtype, seed=seed + 1)
    v = fresh((t, kv_heads, head_dim), dtype, seed=seed + 2)
    samples = packed.cu_seqlens.numel() - 1
    text_cu = torch.tensor([0, 2, 2, 5, 6][: samples + 1], dtype=torch.int32)
    text = dict(
        text_k=fresh((6, kv_heads, head_dim), dtype, seed=seed + 3),
        text_v=fresh((6, kv_heads, head_dim), dtype, seed=seed + 4),
        text_cu_seqlens=text_cu,
        gate=fresh((heads,), dtype, seed=seed + 5),
    )
    freqs = fk.rope_freqs(head_dim, packed.positions, axes_dims=(4, 4, 8), theta=100.0)
    return q, k, v, text, freqs


def _to(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _on_device(tiles):
    """A TileLayout with its tensors on the test device."""
    return dataclasses.replace(tiles, **{f.name: _to(getattr(tiles, f.name)) for f in dataclasses.fields(tiles)})


@pytest.mark.parametrize("sparsity", [WINDOW, TOP_K], ids=str)
def test_reference_backend_is_the_masked_reference(sparsity):
    """float64: the op's reference backend (with LSE, GQA, RoPE, text) is fk.tile_sparse_attention, its LSE the
    masked scores' logsumexp, and last_tile_blocks() the call's lists and density."""
    packed = _pack()
    q, k, v, text, freqs = _inputs(packed)
    out, lse = fk.varlen_attention(
        q, k, v, packed.cu_seqlens, packed.max_seqlen, freqs=freqs, return_lse=True, backend="reference",
        sparsity=sparsity, tiles=packed.tiles, **text,
    )  # fmt: skip
    want, blocks = fk.tile_sparse_attention(q, k, v, packed.cu_seqlens, packed.tiles, sparsity, freqs=freqs, **text)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    recorded = fk.last_tile_blocks()
    assert torch.equal(recorded.keys, blocks.keys) and torch.equal(recorded.density, blocks.density)
    assert 0 < recorded.density.item() < 1
    # The LSE: logsumexp over the visited keys only (the mask from the pattern, rotated q and k).
    qr, kr = ref.tile_sparsity.rotated(q, k, freqs)
    mask = ref.tile_sparsity.tile_sparse_mask(packed.tiles, packed.cu_seqlens, blocks)
    scores = torch.einsum("qhd,khd->hqk", qr, kr.repeat_interleave(2, 1)) / 4.0
    torch.testing.assert_close(lse, scores.masked_fill(~mask, float("-inf")).logsumexp(-1))


def test_dense_window_is_dense_attention():
    packed = _pack()
    q, k, v, text, _ = _inputs(packed, seed=10)
    every_tile = fk.TileSparsity(window=(9, 9, 9))
    out = fk.varlen_attention(
        q, k, v, packed.cu_seqlens, packed.max_seqlen, backend="reference", sparsity=every_tile,
        tiles=packed.tiles, **text,
    )  # fmt: skip
    torch.testing.assert_close(out, fk.varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, **text))
    assert fk.last_tile_blocks().density.item() == pytest.approx(1.0)


def test_argument_errors_name_the_argument():
    packed = _pack()
    q, k, v, _, _ = _inputs(packed)
    cu, n = packed.cu_seqlens, packed.max_seqlen
    with pytest.raises(ValueError, match="sparsity is given without tiles"):
        fk.varlen_attention(q, k, v, cu, n, sparsity=WINDOW)
    with pytest.raises(ValueError, match="tiles is given without sparsity"):
        fk.varlen_attention(q, k, v, cu, n, tiles=packed.tiles)
    with pytest.raises(TypeError, match="sparsity must be a fk\\.TileSparsity"):
        fk.varlen_attention(q, k, v, cu, n, sparsity=(3, 3, 3), tiles=packed.tiles)
    with pytest.raises(TypeError, match="tiles must be the TileLayout"):
        fk.varlen_attention(q, k, v, cu, n, sparsity=WINDOW, tiles=packed)
    with pytest.raises(ValueError, match="not with cu_seqlens_k"):
        fk.varlen_attention(q, k, v, cu, n, cu_seqlens_k=cu, max_seqlen_k=n, sparsity=WINDOW, tiles=packed.tiles)
    other = _pack(MIXED[:2])  # a layout of other samples
    with pytest.raises(ValueError, match="q and k must have the pack's"):
        fk.varlen_attention(q, k, v, cu, n, sparsity=WINDOW, tiles=other.tiles)


@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
def test_backends_without_block_lists_say_why(backend):
    packed = _pack()
    q, k, _, _, _ = _inputs(packed)
    with pytest.raises(NotImplementedError, match=f"backend '{backend}' does not run tile-sparse attention"):
        attention_op._sparse_lists(WINDOW, packed.tiles, backend, q, k, packed.cu_seqlens, False, 0.25, None)


# The Triton kernels (interpreted on the CPU: fp32 and fp16 dots) against the float64 masked reference. The
# reference takes the lists the kernel call recorded (fk.last_tile_blocks), so a top-k near-tie that rounds
# differently in float64 cannot change the pattern under comparison (the selection itself is checked against
# brute force in test_attention_tile_sparsity.py).
KERNEL_CASES = [
    # (sparsity, dtype, text, rope, kv heads, deterministic backward, latents)
    (WINDOW, torch.float32, True, True, 2, False, MIXED),
    (TOP_K, torch.float16, True, False, 4, True, MIXED),
    (fk.TileSparsity(window=(1, 2, 1), top_k=1), torch.float32, False, True, 1, False, [(C, 7, 6, 10), (C, 6, 14)]),
]


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize(("sparsity", "dtype", "text", "rope", "kv_heads", "deterministic", "latents"), KERNEL_CASES,
                         ids=["window-text-rope-gqa", "topk-fp16-text-ordered-dq", "both-odd-grid-mqa"])  # fmt: skip
def test_triton_matches_the_masked_reference(sparsity, dtype, text, rope, kv_heads, deterministic, latents):
    """Odd tile grids (partial edge tiles), mixed images and videos in one pack, GQA / MQA, the dense text branch,
    RoPE; poisoned allocations (an unwritten row shows); output, LSE and every gradient (q, k, v, text keys and
    values, gate; dq by atomics or the ordered dq kernel) against float64."""
    packed = _pack(latents)
    q, k, v, text_inputs, freqs = _inputs(packed, dtype, kv_heads=kv_heads, seed=20)
    cu, n = packed.cu_seqlens.to(DEVICE), packed.max_seqlen
    tiles = _on_device(packed.tiles)
    freqs = _to(freqs) if rope else None  # not an input the comparison differentiates
    lse = dtype == torch.float32  # the LSE is float32 whatever q's dtype: compared (and differentiated) in fp32

    def kernel(q, k, v, **kw):
        return fk.varlen_attention(q, k, v, cu, n, return_lse=lse, backend="triton", sparsity=sparsity,
                                   tiles=tiles, freqs=freqs, deterministic=deterministic, **kw)  # fmt: skip

    def reference(q, k, v, **kw):
        mask = ref.tile_sparsity.tile_sparse_mask(tiles, cu, fk.last_tile_blocks())
        return ref.varlen_attention(q, k, v, cu, n, return_lse=lse, mask=mask, freqs=freqs, **kw)

    inputs = {"q": q, "k": k, "v": v, **(text_inputs if text else {})}
    compare_with_reference(kernel, reference, {x: _to(t) for x, t in inputs.items()}, dtype, family="attention")


# The descriptor (TMA) and warp-specialized loop shape of the three kernels (fwd._attend_listed, bwd._dq_listed,
# bwd._dkdv_listed: one loop over the listed tiles in chunks of the block, then the rest run), forced as
# force_warp_specialized does (the interpreter runs the descriptor code and ignores warp_specialize). Tile
# volumes of 40 and 36 rows with 32-row blocks: two chunks per tile, a partial tile's second chunk fully masked
# or partly; images of one tile and of one patch; the rest run (placeholder rows, or a placeholder program's whole
# sample) ends at the sample's end, where its last block reads past the sample (zero-filled rows) or into the next;
# per-head top-k lists of different lengths in one MQA group (dk/dv pads the shorter ones); text.
DESCRIPTOR_CASES = [
    # (sparsity, dtype, text, kv heads, tile, latents)
    (WINDOW, torch.float16, True, 2, (2, 4, 5), [(C, 5, 10, 14), (C, 4, 6), (C, P, P), (C, 3, 12, 8)]),
    (fk.TileSparsity(top_k=2), torch.float32, False, 1, (1, 6, 6), [(C, 2, 14, 26), (C, 12, 12), (C, 8, 18)]),
]


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize(("sparsity", "dtype", "text", "kv_heads", "tile", "latents"), DESCRIPTOR_CASES,
                         ids=["window-fp16-text-gqa", "topk-fp32-mqa"])  # fmt: skip
def test_descriptor_loops_match_the_masked_reference(monkeypatch, sparsity, dtype, text, kv_heads, tile, latents):
    """The tile-sparse forward, dq and dk/dv kernels on their descriptor / warp-specialized tiles (checked to be
    the tiles that ran) against the float64 masked reference: output, LSE and every gradient, poisoned outputs."""
    from flagdit_kernels.triton.attention import launch as va

    if ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized tiles are offered on sm_90 only")
    force_warp_specialized(monkeypatch)
    ran = []

    def recorded(kernel):
        run = kernel._run
        return lambda tile, grid, args, consts: (ran.append((kernel.name, tile)), run(tile, grid, args, consts))

    for kernel in (va.SPARSE_FORWARD, va.DKDV, va.DQ):
        monkeypatch.setattr(kernel, "_run", recorded(kernel))
    packed = _pack(latents, tile)
    q, k, v, text_inputs, _ = _inputs(packed, dtype, kv_heads=kv_heads, seed=30)
    cu, n = packed.cu_seqlens.to(DEVICE), packed.max_seqlen
    tiles = _on_device(packed.tiles)
    lse = dtype == torch.float32

    def kernel(q, k, v, **kw):
        return fk.varlen_attention(q, k, v, cu, n, return_lse=lse, backend="triton", sparsity=sparsity, tiles=tiles,
                                   **kw)  # fmt: skip

    def reference(q, k, v, **kw):
        mask = ref.tile_sparsity.tile_sparse_mask(tiles, cu, fk.last_tile_blocks())
        return ref.varlen_attention(q, k, v, cu, n, return_lse=lse, mask=mask, **kw)

    inputs = {"q": q, "k": k, "v": v, **(text_inputs if text else {})}
    compare_with_reference(kernel, reference, {x: _to(t) for x, t in inputs.items()}, dtype, family="attention")
    assert {name for name, _ in ran} == {"sparse forward", "dk/dv", "dq"}
    assert all(t.tma and t.ws for _, t in ran)


@pytest.mark.parametrize("sparsity", [WINDOW, TOP_K], ids=str)
def test_kernel_tables_are_the_lists(sparsity):
    """The Triton kernels' tables (built with torch ops on the device, no sync): each list's stretches of
    consecutive tiles are exactly its tiles, in order, and each stretch is one contiguous token run; the
    transposed lists hold, per key tile, exactly the query tiles that list it."""
    from flagdit_kernels.triton.attention import sparse

    packed = _pack()
    q, k, _, _, _ = _inputs(packed)
    blocks = fk.tile_sparse_blocks(q, k, packed.cu_seqlens, packed.tiles, sparsity)
    keys, counts = blocks.keys, blocks.counts
    run_counts, pairs = sparse.runs(keys)
    ranges = packed.tiles.ranges.tolist()
    for h, t in itertools.product(range(keys.shape[0]), range(keys.shape[1])):
        tiles = keys[h, t, : counts[h, t]].tolist()
        stretches = pairs[h, t, : run_counts[h, t]].tolist()
        assert [x for a, b in stretches for x in range(a, b + 1)] == tiles
        assert all(ranges[x][1] == ranges[x + 1][0] for a, b in stretches for x in range(a, b))
        assert (pairs[h, t, run_counts[h, t] :] == -1).all()
    t_keys, t_counts = sparse.transposed(keys, packed.tiles.max_tiles)
    for h, kt in itertools.product(range(keys.shape[0]), range(keys.shape[1])):
        want = [t for t in range(keys.shape[1]) if kt in keys[h, t, : counts[h, t]].tolist()]
        assert t_keys[h, kt, : t_counts[h, kt]].tolist() == want
        assert (t_keys[h, kt, t_counts[h, kt] :] == -1).all()


@pytest.mark.parametrize("sparsity", [WINDOW, TOP_K], ids=str)
def test_table_sections_locate_every_part(sparsity):
    """sparse.table_sections, the one description of the table's layout the kernels read (jitted) and the host
    reads (transposed_lists), puts each section where sparse.lists writes it, for the forward's table and for the
    transposed one (its lists as wide as the most tiles of a sample)."""
    from flagdit_kernels.triton.attention import sparse

    packed = _pack()
    q, k, _, _, _ = _inputs(packed)
    tiles, cu = packed.tiles, packed.cu_seqlens
    blocks = fk.tile_sparse_blocks(q, k, cu, tiles, sparsity)
    table, sizes = sparse.lists(tiles, cu, blocks.keys, blocks.counts)
    t_table, t_sizes = sparse.transposed_lists(table, sizes)
    t_keys, t_counts = sparse.transposed(blocks.keys, tiles.max_tiles)
    slots = torch.cat([cu.new_zeros(1), (cu[1:] - tiles.patch_end).cumsum(0)])
    shared = [tiles.ranges, tiles.sample, tiles.patch_end, slots]
    for t, (n_tiles, heads, width, volume, _, _), keys, counts in (
        (table, sizes, blocks.keys, blocks.counts), (t_table, t_sizes, t_keys, t_counts),
    ):  # fmt: skip
        starts = sparse.table_sections((0, n_tiles, heads, width, volume), cu.numel() - 1)
        assert starts[-1] == t.numel()
        parts = [*shared, *sparse.runs(keys), counts, keys]
        for part, first, end in zip(parts, starts[:-1], starts[1:], strict=True):
            assert torch.equal(t[first:end], part.reshape(-1).to(torch.int32))


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_sparse_custom_op_schema():
    """The custom ops with a tile-sparse call's tables (sparse_lists tensor, sparse_sizes int list): schema and
    fake tensor checks."""
    from flagdit_kernels.ops import attention as attn
    from flagdit_kernels.triton.attention import sparse

    packed = _pack([(C, 3, 6, 8), (C, 4, 6)], tile=(2, 2, 2))
    cu = packed.cu_seqlens.to(DEVICE)
    tiles = _on_device(packed.tiles)
    q, k, v, _, _ = _inputs(packed, torch.float32, heads=2, kv_heads=1, seed=40)
    q, k, v = _to(q), _to(k), _to(v)
    blocks = fk.tile_sparse_blocks(q, k, cu, tiles, TOP_K)
    lists, sizes = sparse.lists(tiles, cu, blocks.keys, blocks.counts)
    n = packed.max_seqlen
    fwd_args = (q, k, v, cu, n, 0.25, None, None, None, None, None, True, False, None, None, lists, sizes)
    torch.library.opcheck(attn._fwd_op, fwd_args, test_utils=("test_schema", "test_faketensor"))
    out, o_text, lse, lse_t, _, _, _ = attn._fwd_op(*fwd_args)
    bwd_args = (torch.randn_like(out), None, q, k, v, out, o_text, lse, lse_t, cu, n, 0.25, None, None, None, None,
                None, False, None, None, lists, sizes)  # fmt: skip
    torch.library.opcheck(attn._bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not (ON_GPU or INTERPRETED), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_torch_compile_fullgraph():
    """A sparse call (the lists built on the device, the tables, the custom ops) traces without a graph break
    and matches eager, forward and backward."""
    packed = _pack([(C, 3, 6, 8), (C, 4, 6)], tile=(2, 2, 2))
    cu, tiles = packed.cu_seqlens.to(DEVICE), _on_device(packed.tiles)
    q, k, v, _, _ = _inputs(packed, torch.float32, heads=2, kv_heads=1, seed=50)
    sparsity = fk.TileSparsity(window=(1, 2, 2), top_k=1)

    def step(q, k, v):
        out = fk.varlen_attention(q, k, v, cu, packed.max_seqlen, backend="triton", sparsity=sparsity, tiles=tiles)
        return out * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [_to(t).detach().clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    out.sum().backward()
    eager = [_to(t).detach().clone().requires_grad_() for t in (q, k, v)]
    expected = step(*eager)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)
