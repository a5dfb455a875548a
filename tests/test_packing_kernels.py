"""pack / unpack / embed_packed: every backend against the reference and each other.

Packing moves data without arithmetic, so kernels must match the reference *exactly* (outputs and
gradients); the poisoned-allocation harness additionally catches elements a kernel forgot to write.
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import (
    DEVICE,
    INTERPRETED,
    ON_GPU,
    backend_params,
    compare_with_reference,
    fresh,
    poisoned_allocations,
)

import flagdit_kernels as fk
from flagdit_kernels import reference as ref
from flagdit_kernels.reference.embed import embed_packed as embed_packed_reference

P = 2
C = 3
# Images of different aspect ratios, a video with F=5, a 1x1-patch item, and one item larger than all others.
MIXED = [(C, 8, 12), (C, 12, 4), (C, 5, 6, 4), (C, P, P), (C, 20, 16), (C, 6, 6)]
FLAGS = [(True, True), (False, False), (True, False), (False, True)]


PACK_BACKENDS = backend_params("pack", reference=False)


def _latents(shapes, dtype=torch.float32, seed=0):
    return [fresh(s, dtype, seed=seed + i) for i, s in enumerate(shapes)]


def _assert_packed_equal(a: fk.Packed, b: fk.Packed) -> None:
    assert torch.equal(a.patches, b.patches)
    assert torch.equal(a.positions, b.positions) and a.positions.dtype == torch.int32
    assert torch.equal(a.kind, b.kind) and a.kind.dtype == torch.int8
    assert torch.equal(a.cu_seqlens, b.cu_seqlens) and a.cu_seqlens.dtype == torch.int32
    assert torch.equal(a.patch_rows, b.patch_rows)
    assert a.max_seqlen == b.max_seqlen and a.shapes == b.shapes


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize(("nextline", "nextframe"), FLAGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_pack_matches_reference(backend, nextline, nextframe, channels_last):
    latents = _latents(MIXED)
    with poisoned_allocations():
        mine = fk.pack(latents, P, nextline, nextframe, channels_last=channels_last, backend=backend)
    want = ref.pack(latents, P, nextline, nextframe, channels_last)
    _assert_packed_equal(mine, want)
    assert mine.patches.device == DEVICE and mine.cu_seqlens.device == DEVICE and mine.kind.device == DEVICE


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize(("nextline", "nextframe"), FLAGS[:3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unpack_matches_reference(backend, nextline, nextframe, channels_last):
    packed = ref.pack(_latents(MIXED), P, nextline, nextframe)
    out_channels = 5
    # A strided view: the token vectors are a column slice of a wider buffer.
    wide = fresh((packed.kind.shape[0], P * P * out_channels + 3), torch.float32, seed=7)
    tokens = wide[:, 1 : 1 + P * P * out_channels]
    with poisoned_allocations():
        mine = fk.unpack(tokens, packed, out_channels, channels_last=channels_last, backend=backend)
    want = ref.unpack(tokens, packed, out_channels, channels_last)
    assert len(mine) == len(want)
    for m, w in zip(mine, want):
        assert m.shape == w.shape and torch.equal(m, w)


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_round_trip_exact(backend, dtype, channels_last):
    latents = _latents(MIXED, dtype, seed=3)
    packed = fk.pack(latents, P, channels_last=channels_last, backend=backend)
    assert (packed.patches[packed.kind != 0] == 0).all()
    back = fk.unpack(packed.patches, packed, C, channels_last=channels_last, backend=backend)
    for b, x in zip(back, latents):
        assert b.dtype == dtype and torch.equal(b, x)


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize(
    ("p", "shapes"),
    [
        (1, [(5, 3, 7), (5, 2, 1, 4), (5, 1, 1)]),  # p=1, odd channel count
        (3, [(2, 6, 9), (2, 3, 3, 6), (2, 3, 3)]),  # patch size that is not a power of two
        (4, [(3, 8, 4), (3, 4, 12)]),
    ],
)
def test_other_patch_sizes(backend, p, shapes):
    latents = _latents(shapes, seed=11)
    for channels_last in (False, True):
        mine = fk.pack(latents, p, channels_last=channels_last, backend=backend)
        _assert_packed_equal(mine, ref.pack(latents, p, True, True, channels_last))
        back = fk.unpack(mine.patches, mine, shapes[0][0], channels_last=channels_last, backend=backend)
        assert all(torch.equal(b, x) for b, x in zip(back, latents))


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize("channels", [4, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_power_of_two_channels(backend, channels, channels_last):
    # Power-of-two channel counts make every token row one unpadded run (the kernels' 2-D row path, both orders).
    shapes = [(channels, *s[1:]) for s in MIXED[:4]]
    latents = _latents(shapes, seed=13)
    mine = fk.pack(latents, P, channels_last=channels_last, backend=backend)
    _assert_packed_equal(mine, ref.pack(latents, P, True, True, channels_last))
    back = fk.unpack(mine.patches, mine, channels, channels_last=channels_last, backend=backend)
    assert all(torch.equal(b, x) for b, x in zip(back, latents))


@pytest.mark.parametrize("backend", PACK_BACKENDS)
def test_unpack_column_strided_tokens(backend):
    # Token vectors with a non-unit column stride (a transposed buffer).
    packed = ref.pack(_latents(MIXED[:4]), P)
    tokens = fresh((P * P * 4, packed.kind.shape[0]), torch.float32, seed=17).t()
    assert tokens.stride(1) != 1
    for channels_last in (False, True):
        mine = fk.unpack(tokens, packed, 4, channels_last=channels_last, backend=backend)
        for m, w in zip(mine, ref.unpack(tokens, packed, 4, channels_last)):
            assert torch.equal(m, w)


@pytest.mark.parametrize("backend", PACK_BACKENDS)
def test_many_channels_span_channel_blocks(backend):
    # 150 channels with p=2 exceed one kernel tile's channel block: the grid's channel axis is exercised.
    latents = _latents([(150, 4, 6), (150, 2, 2, 2)], seed=5)
    mine = fk.pack(latents, P, channels_last=True, backend=backend)
    _assert_packed_equal(mine, ref.pack(latents, P, True, True, True))
    back = fk.unpack(mine.patches, mine, 150, channels_last=True, backend=backend)
    assert all(torch.equal(b, x) for b, x in zip(back, latents))


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize(
    "shapes",
    [
        [(64, 4, 80), (64, 2, 6, 36)],  # rows wider than a Triton segment: several column tiles, the last partial
        [(16, 40, 8), (16, 3, 34, 4)],  # narrow items: several rows per segment, the last row block partial
    ],
    ids=["column_tiles", "row_blocks"],
)
def test_segments_split_rows_and_columns(backend, shapes):
    latents = _latents(shapes, seed=7)
    for channels_last in (False, True):
        with poisoned_allocations():
            mine = fk.pack(latents, P, channels_last=channels_last, backend=backend)
        _assert_packed_equal(mine, ref.pack(latents, P, True, True, channels_last))
        with poisoned_allocations():
            back = fk.unpack(mine.patches, mine, shapes[0][0], channels_last=channels_last, backend=backend)
        assert all(torch.equal(b, x) for b, x in zip(back, latents))


def _strided_latents():
    """Non-contiguous latents: a transposed image, a column slice, a frame-major video, an H-strided image."""
    a = fresh((C, 12, 8), torch.float32, seed=21).transpose(1, 2)  # (C, 8, 12), W stride != 1
    b = fresh((C, 6, 13), torch.float32, seed=22)[:, :, 1:11]  # (C, 6, 10): storage offset, padded rows
    c = fresh((5, C, 4, 6), torch.float32, seed=23).permute(1, 0, 2, 3)  # (C, F=5, 4, 6), frame-major storage
    d = fresh((C, 8, 6), torch.float32, seed=24)[:, ::2, :]  # (C, 4, 6), H stride 12
    latents = [a, b, c, d]
    assert not any(x.is_contiguous() for x in latents)
    return latents


@pytest.mark.parametrize("backend", PACK_BACKENDS)
def test_strided_latents(backend):
    latents = _strided_latents()
    for channels_last in (False, True):
        mine = fk.pack(latents, P, channels_last=channels_last, backend=backend)
        _assert_packed_equal(mine, ref.pack([x.contiguous() for x in latents], P, True, True, channels_last))


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_gradients(backend, dtype):
    shapes = MIXED[:4]
    inputs = {f"x{i}": t for i, t in enumerate(_latents(shapes, dtype, seed=30))}

    def mine(**xs):
        return fk.pack(list(xs.values()), P, channels_last=False, backend=backend).patches

    def want(**xs):
        return ref.pack(list(xs.values()), P).patches

    compare_with_reference(
        mine, want, inputs, dtype, tol=1e-6 if dtype == torch.float32 else 1e-2
    )  # upstream rounding only
    # Exactness of the gradient (placeholder rows give none): compare with the reference in the same dtype.
    xs = [t.detach().clone().requires_grad_() for t in inputs.values()]
    ys = [t.detach().clone().requires_grad_() for t in inputs.values()]
    out = fk.pack(xs, P, backend=backend).patches
    upstream = fresh(out.shape, dtype, seed=31)
    torch.autograd.backward(out, upstream)
    torch.autograd.backward(ref.pack(ys, P).patches, upstream)
    for x, y in zip(xs, ys):
        assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("backend", PACK_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_unpack_gradients(backend, channels_last):
    packed = ref.pack(_latents(MIXED[:4]), P)
    out_channels = 4
    tokens = fresh((packed.kind.shape[0], P * P * out_channels), torch.float32, seed=40)
    compare_with_reference(
        lambda tokens: fk.unpack(tokens, packed, out_channels, channels_last=channels_last, backend=backend),
        lambda tokens: ref.unpack(tokens, packed, out_channels, channels_last),
        {"tokens": tokens},
        torch.float32,
        tol=1e-6,  # the fp32 rounding of the fp64 upstream gradient; exactness is checked below
    )
    # Only some outputs used: the others count as zero gradient; placeholder rows get exactly zero.
    t = tokens.clone().requires_grad_()
    outs = fk.unpack(t, packed, out_channels, channels_last=channels_last, backend=backend)
    (outs[1] * fresh(outs[1].shape, torch.float32, seed=41)).sum().backward()
    t_ref = tokens.clone().requires_grad_()
    ref_outs = ref.unpack(t_ref, packed, out_channels, channels_last)
    (ref_outs[1] * fresh(outs[1].shape, torch.float32, seed=41)).sum().backward()
    assert torch.equal(t.grad, t_ref.grad)
    assert (t.grad[packed.kind != 0] == 0).all()


@pytest.mark.skipif(not (INTERPRETED or ON_GPU), reason="triton runs only on a GPU or under TRITON_INTERPRET=1")
def test_triton_ops_compile_fullgraph():
    latents = _latents(MIXED[:3])
    weights = [fresh(x.shape, torch.float32, seed=50 + i) for i, x in enumerate(latents)]

    def step(xs):
        packed = fk.pack(xs, P, backend="triton")
        tokens = packed.patches * 2.0
        outs = fk.unpack(tokens, packed, C, channels_last=False, backend="triton")
        return sum((o * w).sum() for o, w in zip(outs, weights)), packed.positions, packed.kind

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xs = [x.clone().requires_grad_() for x in latents]
    loss, positions, kind = compiled(xs)
    loss.backward()
    want = ref.pack(latents, P)
    assert torch.equal(positions, want.positions) and torch.equal(kind, want.kind)
    for x, w in zip(xs, weights):
        assert torch.equal(x.grad, 2.0 * w)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("backend", [None, "reference"])
def test_pack_bad_input(backend):
    x = fresh((C, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="non-empty list"):
        fk.pack([], P, backend=backend)
    with pytest.raises(ValueError, match="channels but latents"):
        fk.pack([x, fresh((C + 1, 4, 4), torch.float32)], P, backend=backend)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        fk.pack([x, fresh((C, 5, 4), torch.float32)], P, backend=backend)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        fk.pack([x, fresh((C, 2, 4, 6), torch.float32)], 4, backend=backend)
    with pytest.raises(TypeError, match="has dtype"):
        fk.pack([x, fresh((C, 4, 4), torch.float16)], P, backend=backend)
    with pytest.raises(ValueError, match="is on meta"):
        fk.pack([x, torch.empty(C, 4, 4, device="meta")], P, backend=backend)
    with pytest.raises(ValueError, match="3-D or 4-D"):
        fk.pack([fresh((C, 4), torch.float32)], P, backend=backend)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        fk.pack([x], 0, backend=backend)


def test_unpack_bad_input():
    packed = ref.pack([fresh((C, 4, 4), torch.float32)], P)
    tokens = fresh((packed.kind.shape[0], P * P * C), torch.float32)
    with pytest.raises(ValueError, match=r"tokens must be \(T, p\*p\*out_channels\)"):
        fk.unpack(tokens[:-1], packed, C)
    with pytest.raises(ValueError, match=r"tokens must be \(T, p\*p\*out_channels\)"):
        fk.unpack(tokens, packed, C + 1)
    with pytest.raises(TypeError, match="packed must be a Packed"):
        fk.unpack(tokens, (tokens,), C)
    with pytest.raises(ValueError, match="is on meta"):
        fk.unpack(torch.empty(tokens.shape, device="meta"), packed, C)


# --------------------------------------------------------------------------------------------- embed_packed

EMBED_BACKENDS = backend_params("embed_packed")


@pytest.mark.parametrize("backend", EMBED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_embed_packed(backend, dtype, with_bias):
    packed = ref.pack(_latents(MIXED, dtype), P)
    dim = 40
    inputs = {
        "patches": fresh(packed.patches.shape, dtype, seed=60),  # placeholder rows non-zero on purpose
        "weight": fresh((dim, P * P * C), dtype, seed=61, scale=0.3),
        "bias": fresh((dim,), dtype, seed=62) if with_bias else None,
        "table": fresh((2, dim), dtype, seed=63),
    }
    compare_with_reference(
        lambda patches, weight, bias, table: fk.embed_packed(
            patches, packed.kind, weight, bias, table, backend=backend
        ),
        lambda patches, weight, bias, table: embed_packed_reference(patches, packed.kind, weight, bias, table),
        inputs,
        dtype,
    )
    out = fk.embed_packed(inputs["patches"], packed.kind, inputs["weight"], inputs["bias"], inputs["table"])
    for k in (1, 2):
        assert torch.equal(out[packed.kind == k], inputs["table"][k - 1].expand_as(out[packed.kind == k]))


@pytest.mark.parametrize("backend", EMBED_BACKENDS)
def test_embed_packed_placeholder_rows_get_no_gradient(backend):
    packed = ref.pack(_latents(MIXED[:3]), P)
    patches = fresh(packed.patches.shape, torch.float32, seed=70).requires_grad_()
    weight = fresh((16, P * P * C), torch.float32, seed=71).requires_grad_()
    table = fresh((2, 16), torch.float32, seed=72).requires_grad_()
    out = fk.embed_packed(patches, packed.kind, weight, None, table, backend=backend)
    upstream = fresh(out.shape, torch.float32, seed=73)
    out.backward(upstream)
    assert (patches.grad[packed.kind != 0] == 0).all()
    assert torch.allclose(table.grad[0], upstream[packed.kind == 1].sum(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(table.grad[1], upstream[packed.kind == 2].sum(0), rtol=1e-5, atol=1e-5)


def test_embed_packed_bad_input():
    packed = ref.pack(_latents(MIXED[:2]), P)
    patches, kind = packed.patches, packed.kind
    weight, bias, table = fresh((8, P * P * C), torch.float32), fresh((8,), torch.float32), fresh((2, 8), torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        fk.embed_packed(patches, kind, weight[:, 1:], bias, table)
    with pytest.raises(ValueError, match="placeholder_embeddings must have shape"):
        fk.embed_packed(patches, kind, weight, bias, table[:1])
    with pytest.raises(ValueError, match="bias must have shape"):
        fk.embed_packed(patches, kind, weight, bias[1:], table)
    with pytest.raises(ValueError, match="kind must have one entry"):
        fk.embed_packed(patches, kind[1:], weight, bias, table)
    with pytest.raises(TypeError, match="kind must have dtype"):
        fk.embed_packed(patches, kind.long(), weight, bias, table)
    with pytest.raises(TypeError, match="weight has dtype"):
        fk.embed_packed(patches, kind, weight.half(), bias, table)


@pytest.mark.parametrize("other", ["cpu", "cuda"])
def test_triton_agrees_with_compiled_backend(other):
    available = fk.available_backends("pack", DEVICE)
    if "triton" not in available or other not in available:
        pytest.skip(f"needs both the triton and the {other} backend here")
    latents = _latents(MIXED, seed=80)
    a = fk.pack(latents, P, backend="triton")
    b = fk.pack(latents, P, backend=other)
    _assert_packed_equal(a, b)
    tokens = fresh((a.kind.shape[0], P * P * 2), torch.float32, seed=81)
    for x, y in zip(fk.unpack(tokens, a, 2, backend="triton"), fk.unpack(tokens, b, 2, backend=other)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", PACK_BACKENDS)
def test_double_backward(backend):
    # Pack's backward (an unpack) and unpack's backward (a pack) are differentiable too: the gradient of
    # <grad_x(<pack(x), v>), w> with respect to v is pack(w) in both the kernel and the reference.
    def second_order(fn_pack, fn_unpack):
        x = [fresh(s, torch.float64, seed=90 + i).requires_grad_() for i, s in enumerate(MIXED[:3])]
        patches = fn_pack(x)
        v = fresh(patches.shape, torch.float64, seed=93).requires_grad_()
        gx = torch.autograd.grad(patches, x, v, create_graph=True)
        w = [fresh(g.shape, torch.float64, seed=94 + i) for i, g in enumerate(gx)]
        (gv,) = torch.autograd.grad(gx, v, w)
        packed = ref.pack([t.detach() for t in x], P)
        t = fresh(patches.shape, torch.float64, seed=97).requires_grad_()
        outs = fn_unpack(t, packed)
        u = [fresh(o.shape, torch.float64, seed=98 + i).requires_grad_() for i, o in enumerate(outs)]
        (gt,) = torch.autograd.grad(outs, t, u, create_graph=True)
        gu = torch.autograd.grad(gt, u, fresh(gt.shape, torch.float64, seed=99))
        return gv, gu

    mine = second_order(
        lambda x: fk.pack(x, P, backend=backend).patches,
        lambda t, packed: fk.unpack(t, packed, C, channels_last=False, backend=backend),
    )
    want = second_order(lambda x: ref.pack(x, P).patches, lambda t, packed: ref.unpack(t, packed, C, False))
    assert torch.equal(mine[0], want[0])
    assert all(torch.equal(a, b) for a, b in zip(mine[1], want[1]))


@pytest.mark.skipif(not (INTERPRETED or ON_GPU), reason="triton runs only on a GPU or under TRITON_INTERPRET=1")
def test_embed_packed_triton_compiles_fullgraph():
    packed = ref.pack(_latents(MIXED[:2]), P)
    weight = fresh((8, P * P * C), torch.float32, seed=100).requires_grad_()
    table = fresh((2, 8), torch.float32, seed=101).requires_grad_()
    fn = torch.compile(
        lambda x, w, t: fk.embed_packed(x, packed.kind, w, None, t, backend="triton").sum(),
        fullgraph=True,
        backend="aot_eager",
    )
    fn(packed.patches, weight, table).backward()
    w2, t2 = weight.detach().clone().requires_grad_(), table.detach().clone().requires_grad_()
    embed_packed_reference(packed.patches, packed.kind, w2, None, t2).sum().backward()
    assert torch.allclose(weight.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(table.grad, t2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", EMBED_BACKENDS)
def test_embed_packed_out_of_range_kinds_are_patch_rows(backend):
    """kind values outside {0, 1, 2} (what an unchecked GPU call may pass) are patch rows on every backend:
    the placeholder table is read only at rows 0 and 1, and gradients follow the same rule."""
    packed = ref.pack(_latents(MIXED[:3]), P)
    kind = packed.kind.clone()
    odd = torch.tensor([-100, -1, 3, 127], dtype=torch.int8, device=kind.device)
    kind[: odd.numel()] = odd
    inputs = {
        "patches": fresh(packed.patches.shape, torch.float32, seed=110),
        "weight": fresh((24, P * P * C), torch.float32, seed=111),
        "bias": fresh((24,), torch.float32, seed=112),
        "table": fresh((2, 24), torch.float32, seed=113),
    }
    compare_with_reference(
        lambda patches, weight, bias, table: fk.embed_packed(patches, kind, weight, bias, table, backend=backend),
        lambda patches, weight, bias, table: embed_packed_reference(patches, kind, weight, bias, table),
        inputs,
        torch.float32,
    )
    out = fk.embed_packed(inputs["patches"], kind, inputs["weight"], inputs["bias"], inputs["table"], backend=backend)
    linear = torch.nn.functional.linear(inputs["patches"], inputs["weight"], inputs["bias"])
    torch.testing.assert_close(out[: odd.numel()], linear[: odd.numel()])
