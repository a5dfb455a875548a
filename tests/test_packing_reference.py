"""pack / unpack: the reference's layout rules and the compiled CPU backend against it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.helpers import poisoned_allocations

import flagdit_kernels as fk
from flagdit_kernels.reference.packing import item_tokens

BACKENDS = [b for b in fk.available_backends("pack", "cpu")]


def mixed_batch(dtype=torch.float32, channels=3):
    shapes = [(channels, 8, 12), (channels, 12, 4), (channels, 5, 4, 6), (channels, 2, 2), (channels, 16, 16)]
    return [torch.randn(s, dtype=dtype) for s in shapes]


def test_layout_of_a_video_item():
    packed = fk.pack([torch.randn(2, 2, 4, 6)], 2, backend="reference")
    # 2 frames of 2 rows of (3 patches + [nextline]) and one [nextframe] between them.
    assert packed.cu_seqlens.tolist() == [0, 17]
    assert packed.kind.tolist() == [0, 0, 0, 1] * 2 + [2] + [0, 0, 0, 1] * 2
    assert packed.positions[3].tolist() == [0, 0, 3]  # [nextline] right after its row's last patch
    assert packed.positions[8].tolist() == [0, 2, 0]  # [nextframe] right after its frame's last row
    assert packed.positions[9].tolist() == [1, 0, 0]
    assert packed.max_seqlen == 17 and packed.patches.shape == (17, 8)
    assert torch.equal(packed.patches[packed.kind != 0], torch.zeros(5, 8))


def test_patch_vectors_follow_lumina_patchify():
    x = torch.randn(3, 4, 6)
    packed = fk.pack([x], 2, nextline=False, backend="reference")
    lumina = x.view(3, 2, 2, 3, 2).permute(1, 3, 0, 2, 4).flatten(2).flatten(0, 1)
    assert torch.equal(packed.patches, lumina)


def test_unpack_follows_lumina_final_layer():
    x = torch.randn(3, 4, 6)
    packed = fk.pack([x], 2, nextline=False, backend="reference")
    tokens = torch.randn(6, 2 * 2 * 5)
    lumina = tokens.view(2, 3, 2, 2, 5).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2)
    assert torch.equal(fk.unpack(tokens, packed, 5, backend="reference")[0], lumina)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("nextline,nextframe", [(True, True), (False, True), (True, False)])
def test_backends_agree_exactly(backend, dtype, nextline, nextframe):
    latents = mixed_batch(dtype)
    want = fk.pack(latents, 2, nextline, nextframe, backend="reference")
    with poisoned_allocations():
        got = fk.pack(latents, 2, nextline, nextframe, backend=backend)
    for field in ("patches", "cu_seqlens", "positions", "kind"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    tokens = torch.randn(want.patches.shape[0], 4 * 7, dtype=dtype)
    with poisoned_allocations():
        got_items = fk.unpack(tokens, want, 7, backend=backend)
    for a, b in zip(got_items, fk.unpack(tokens, want, 7, backend="reference")):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_round_trip_is_exact(backend, channels_last):
    latents = mixed_batch()
    packed = fk.pack(latents, 2, channels_last=channels_last, backend=backend)
    back = fk.unpack(packed.patches, packed, 3, channels_last=channels_last, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(back, latents))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_latents(backend):
    base = torch.randn(3, 4, 12, 10)
    latents = [base[:, 1], base[:, 2].transpose(1, 2), base[:, :2, :, :8]]
    assert not latents[1].is_contiguous()
    got = fk.pack(latents, 2, backend=backend).patches
    want = fk.pack([x.contiguous() for x in latents], 2, backend="reference").patches
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_float64(backend):
    """gradcheck of pack and unpack, and every backend's backward equal to the reference's bit for bit (both ops
    only move elements). Through the Triton interpreter a call takes tens of ms and the full Jacobian two calls
    per input element (minutes): there gradcheck runs in fast mode (a random projection of the Jacobian), and
    the exact comparison with the fully gradchecked reference carries the rest."""
    fast = backend == "triton"
    latents = [x.double().requires_grad_() for x in mixed_batch()[:3]]
    assert torch.autograd.gradcheck(lambda *x: fk.pack(list(x), 2, backend=backend).patches, latents, fast_mode=fast)
    packed = fk.pack(latents, 2, backend="reference")
    tokens = torch.randn(packed.patches.shape[0], 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fk.unpack(t, packed, 3, backend=backend), (tokens,), fast_mode=fast)

    upstream = torch.randn_like(packed.patches)
    grads = [
        torch.autograd.grad(fk.pack(latents, 2, backend=b).patches, latents, upstream) for b in (backend, "reference")
    ]
    assert all(torch.equal(ours, ref) for ours, ref in zip(*grads))
    items = [torch.randn_like(x) for x in latents]
    grads = [
        torch.autograd.grad(fk.unpack(tokens, packed, 3, backend=b), tokens, items) for b in (backend, "reference")
    ]
    assert torch.equal(grads[0][0], grads[1][0])
    # Placeholder rows get no gradient from unpack.
    assert torch.equal(grads[0][0][packed.kind != 0], torch.zeros_like(tokens[packed.kind != 0]))


@settings(max_examples=40, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5)), min_size=1, max_size=4),
    p=st.integers(1, 3),
    nextline=st.booleans(),
    nextframe=st.booleans(),
)
def test_token_counts_and_round_trip_property(items, p, nextline, nextframe):
    latents = [torch.randn(2, f, h * p, w * p) if f > 1 else torch.randn(2, h * p, w * p) for f, h, w in items]
    for backend in BACKENDS:
        packed = fk.pack(latents, p, nextline, nextframe, backend=backend)
        lengths = [item_tokens(tuple(x.shape), p, nextline, nextframe) for x in latents]
        assert packed.cu_seqlens.diff().tolist() == lengths
        assert lengths == [f * h * (w + nextline) + (f - 1) * nextframe for f, h, w in items]
        assert int((packed.kind == 0).sum()) == sum(f * h * w for f, h, w in items)
        back = fk.unpack(packed.patches, packed, 2, channels_last=False, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(back, latents))


def test_compiled_pack_traces_without_graph_breaks():
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled extension is not built")
    latents = mixed_batch()
    layout = fk.pack(latents, 2, backend="cpu")

    def patches_only(*xs):
        return torch.ops.flagdit_kernels.pack_patches(list(xs), 2, True, True, False, layout.patches.shape[0])

    compiled = torch.compile(patches_only, fullgraph=True, backend="eager")
    assert torch.equal(compiled(*latents), layout.patches)


@pytest.mark.parametrize(
    "latents,patch_size,match",
    [
        ([], 2, "non-empty list"),
        ([torch.randn(3, 5, 4)], 2, "multiples of patch_size=2"),
        ([torch.randn(3, 4, 4), torch.randn(2, 4, 4)], 2, r"latents\[1\] has 2 channels"),
        ([torch.randn(3, 4, 4), torch.randn(3, 4, 4, dtype=torch.float64)], 2, r"latents\[1\] has dtype"),
        ([torch.randn(4, 4)], 2, r"latents\[0\] must be 3-D or 4-D"),
        ([torch.randn(3, 4, 4)], 0, "patch_size must be a positive int"),
        ([torch.randn(3, 0, 4, 4)], 2, "F >= 1"),
    ],
)
def test_pack_rejects_bad_input(latents, patch_size, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fk.pack(latents, patch_size)


def test_pack_rejects_non_tensors_and_mixed_devices():
    with pytest.raises(TypeError, match=r"latents\[1\] must be a torch.Tensor"):
        fk.pack([torch.randn(3, 4, 4), [1, 2]], 2)
    meta = torch.empty(3, 4, 4, device="meta")
    with pytest.raises(ValueError, match=r"latents\[1\] is on meta"):
        fk.pack([torch.randn(3, 4, 4), meta], 2)


def test_unpack_rejects_bad_input():
    packed = fk.pack([torch.randn(3, 4, 4)], 2)
    with pytest.raises(ValueError, match=r"tokens must be \(T, p\*p\*out_channels\)"):
        fk.unpack(torch.randn(6, 10), packed, 3)
    with pytest.raises(TypeError, match="packed must be a Packed"):
        fk.unpack(torch.randn(6, 12), {"patches": None}, 3)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        fk.unpack(torch.randn(6, 12), packed, 0)
