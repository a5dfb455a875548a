"""Video Sparse Attention's coarse branch (``fk.tile_coarse_attention``) against attention over tile means built
here by brute force from the token positions (tiles found by grouping tokens on (sample, position // tile)), and
the gated branch in ``fk.nn.GatedVarlenAttention`` and the Flag-DiT model (config ``coarse_attention``)."""

from __future__ import annotations

import math

import pytest
import torch
from support.helpers import fresh, needs_triton
from support.model_fixtures import randomized, small_config

import flagdit
import flagdit_kernels as fk
from flagdit_kernels import reference as ref
from flagdit_kernels.reference.packing import PATCH
from flagdit_kernels.reference.rope import rotate

P = 2
C = 3
# A 5-frame video with partial edge tiles, an image, a one-patch image and a 3-frame video.
MIXED = [(C, 5, 6, 8), (C, 8, 12), (C, P, P), (C, 3, 10, 14)]
TILE = (2, 2, 3)


def _pack(shapes=MIXED, tile=TILE):
    latents = [fresh(s, torch.float64, seed=i) for i, s in enumerate(shapes)]
    return ref.pack(latents, P, True, True, tile=tile)


def _qkv(packed, heads=4, kv_heads=2, head_dim=16, seed=70, dtype=torch.float64):
    t = packed.kind.shape[0]
    return [
        fresh((t, h, head_dim), dtype, seed=seed + i).requires_grad_()
        for i, h in enumerate((heads, kv_heads, kv_heads))
    ]


def _brute_force(packed, q, k, v, scale):
    """(T, H, D): per sample, softmax over its tiles of (mean query . mean key) * scale times the mean values,
    given to every patch token of the query tile; zeros at placeholder rows."""
    cu, pos, tile = packed.cu_seqlens.tolist(), packed.positions.tolist(), packed.tile
    group = q.shape[1] // k.shape[1]
    rows = []
    for b in range(len(cu) - 1):
        members: dict[tuple, list[int]] = {}
        for i in range(cu[b], cu[b + 1]):
            if packed.kind[i].item() == PATCH:
                members.setdefault(tuple(pos[i][a] // tile[a] for a in range(3)), []).append(i)
        names = sorted(members)
        qm, km, vm = (torch.stack([x[members[t]].mean(0) for t in names]) for x in (q, k, v))  # (tiles, heads, D)
        km, vm = km.repeat_interleave(group, 1), vm.repeat_interleave(group, 1)
        weights = (torch.einsum("qhd,khd->hqk", qm, km) * scale).softmax(-1)
        coarse = torch.einsum("hqk,khd->qhd", weights, vm)
        tile_of = {i: n for n, t in enumerate(names) for i in members[t]}
        rows += [coarse[tile_of[i]] if i in tile_of else torch.zeros_like(coarse[0]) for i in range(cu[b], cu[b + 1])]
    return torch.stack(rows)


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_coarse_attention_matches_brute_force_forward_and_backward(rope, scale):
    packed = _pack()
    q, k, v = _qkv(packed)
    freqs = None
    if rope:
        freqs = ref.rope_freqs(q.shape[-1], packed.positions, (4, 4, 8)).double()
    out = fk.tile_coarse_attention(q, k, v, packed.tiles, scale, freqs=freqs)
    seen_q, seen_k = (q, k) if freqs is None else (rotate(q, freqs, True), rotate(k, freqs, True))
    want = _brute_force(packed, seen_q, seen_k, v, scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert (out[packed.kind != PATCH] == 0).all()
    grad = fresh(out.shape, torch.float64, seed=80)
    got = torch.autograd.grad((out * grad).sum(), (q, k, v))
    expected = torch.autograd.grad((want * grad).sum(), (q, k, v))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        assert g.abs().sum() > 0


def test_each_tile_sees_its_whole_sample_and_no_other():
    """Changing the values of one sample moves only that sample's coarse output, everywhere in it."""
    packed = _pack()
    q, k, v = (x.detach() for x in _qkv(packed))
    before = fk.tile_coarse_attention(q, k, v, packed.tiles)
    cu = packed.cu_seqlens.tolist()
    v = v.clone()
    v[cu[3] : cu[4]] += 1.0  # the last video
    after = fk.tile_coarse_attention(q, k, v, packed.tiles)
    moved = (after - before).abs().amax(dim=(1, 2)) > 1e-9
    patch = packed.kind == PATCH
    assert not moved[: cu[3]].any()
    assert moved[cu[3] :][patch[cu[3] :]].all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_backend_matches_the_reference(dtype):
    """The attention over the means on the Triton kernels (interpreted on the CPU; bf16 dots are GPU-only)."""
    packed = _pack()
    q, k, v = _qkv(packed, dtype=dtype)
    tiles = fk.pack([fresh(s, torch.float32, seed=i) for i, s in enumerate(MIXED)], P, tile=TILE).tiles
    out = fk.tile_coarse_attention(q, k, v, tiles, backend="triton")
    want = fk.tile_coarse_attention(*(x.double() for x in (q, k, v)), packed.tiles, backend="reference")
    assert out.dtype == dtype
    assert (out.double() - want).norm() / want.norm() < (2e-3 if dtype == torch.float16 else 1e-5)


def test_bad_arguments_are_refused():
    packed = _pack()
    q, k, v = (x.detach() for x in _qkv(packed))
    with pytest.raises(TypeError, match="tiles must be the TileLayout of a tile-major pack"):
        fk.tile_coarse_attention(q, k, v, packed)
    with pytest.raises(ValueError, match="q must have the pack's"):
        fk.tile_coarse_attention(q[1:], k, v, packed.tiles)
    with pytest.raises(ValueError, match="k and v must both be"):
        fk.tile_coarse_attention(q, k, v[:, :1], packed.tiles)
    with pytest.raises(TypeError, match="v"):
        fk.tile_coarse_attention(q, k, v.float(), packed.tiles)
    with pytest.raises(ValueError, match="freqs"):
        fk.tile_coarse_attention(q, k, v, packed.tiles, freqs=torch.zeros(3, 4, 2, dtype=torch.float64))


def test_module_adds_the_gated_branch_only_with_tiles():
    """GatedVarlenAttention(coarse=True): zero gate at start (the output is the plain attention), then
    out + tanh(gate) * coarse per head; a raster call (no tiles) adds nothing."""
    packed = _pack()
    cu, max_seqlen = packed.cu_seqlens, packed.max_seqlen
    attention = fk.nn.GatedVarlenAttention(32, 4, 2, coarse=True, backend="reference").double()
    plain = fk.nn.GatedVarlenAttention(32, 4, 2, backend="reference").double()
    plain.load_state_dict({n: p for n, p in attention.state_dict().items() if n != "coarse_gate"})
    q, k, v = (x.detach() for x in _qkv(packed))
    base = plain.attend(q, k, v, cu, max_seqlen)
    assert torch.equal(attention.attend(q, k, v, cu, max_seqlen, tiles=packed.tiles), base)
    with torch.no_grad():
        attention.coarse_gate.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    gated = attention.attend(q, k, v, cu, max_seqlen, tiles=packed.tiles)
    coarse = fk.tile_coarse_attention(q, k, v, packed.tiles)
    torch.testing.assert_close(gated, base + torch.tanh(attention.coarse_gate).view(1, -1, 1) * coarse)
    assert torch.equal(attention.attend(q, k, v, cu, max_seqlen), base)


def test_model_with_the_coarse_branch_packs_tile_major_and_trains_its_gates():
    config = small_config(coarse_attention=True)
    model = flagdit.FlagDiT(config, backend="reference")
    assert model.pack_tile == flagdit.model.DEFAULT_ATTENTION_TILE and model.attention_sparsity is None
    gates = [n for n in model.state_dict() if n.endswith("coarse_gate")]
    assert len(gates) == config.n_layers
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    model = randomized(model, seed=3)  # not zero-initialized: the gradients reach every block
    model.attention_sparsity, model.attention_tile = fk.TileSparsity(window=(1, 1, 1)), (1, 2, 2)
    xs = [fresh((config.in_channels, 3, 8, 8), torch.float32, seed=1), fresh((config.in_channels, 8, 4), torch.float32)]
    cap = fresh((2, 3, config.cap_feat_dim), torch.float32, seed=2)
    out = model(xs, torch.tensor([0.3, 0.8]), cap, torch.ones(2, 3, dtype=torch.bool))
    sum((o * o.detach().sin()).sum() for o in out).backward()
    assert all(layer.attention.coarse_gate.grad.abs().sum() > 0 for layer in model.layers)
    with pytest.raises(TypeError, match="coarse_attention must be a bool"):
        small_config(coarse_attention="yes")


def test_sequence_parallel_refuses_the_coarse_branch():
    from flagdit.parallel.apply import SequenceParallel

    model = flagdit.FlagDiT(small_config(coarse_attention=True), backend="reference")
    plan = SequenceParallel.__new__(SequenceParallel)  # the check comes before any collective
    with pytest.raises(ValueError, match=r"coarse attention branch .* does not run sequence-parallel"):
        plan.forward(model, [torch.zeros(3, 8, 8)], torch.zeros(1))


def test_a_coarse_run_trains_and_samples_with_its_tiles_from_the_command_line(tmp_path, capsys):
    """flagdit-train --set coarse_attention=True stores the branch's gates; flagdit-sample packs by the tile the run
    trained with (the gates learned those tiles' means) unless told otherwise."""
    from flagdit import checkpoint
    from flagdit.cli import sample, train

    small = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--batch-size", "2", "--warmup", "1",
             "--no-progress", "--threads", "1", "--log-every", "1", "--modality", "video", "--out", str(tmp_path),
             "--set", "coarse_attention=True", "--attention-tile", "1,2,2", "--attention-window", "1,1,2"]  # fmt: skip
    losses = train.train(train.parse_args([*small, "--steps", "4"]))
    assert len(losses) == 4 and all(map(math.isfinite, losses))
    state = checkpoint.load_training_checkpoint(tmp_path / "ckpt.pt")
    gate = state["model"]["layers.0.attention.coarse_gate"]
    assert (
        gate.shape == (2,) and gate.abs().sum() > 0
    )  # zero-initialized; trained once the zero-initialized layers around it let gradients through
    capsys.readouterr()
    out = tmp_path / "s.png"
    common = ["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out), "--steps", "1", "--no-progress",
              "--video-caption", "a red circle on black moving down"]  # fmt: skip
    sample.main(common)
    assert "(attention dense + coarse, tile-major 1,2,2)" in capsys.readouterr().out
    sample.main([*common, "--attention-tile", "2,2,2", "--attention-top-k", "1"])
    assert "(attention top_k=1 + coarse, tile 2,2,2)" in capsys.readouterr().out
