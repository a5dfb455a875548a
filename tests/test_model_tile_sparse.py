"""Flag-DiT with tile-major packing and tile-sparse attention (issue 27): the tile-major pack changes nothing but
the token order (dense outputs and gradients equal the raster pack's, RoPE keeps the raster positions), the
sparsity reaches every block's attention as the masked reference defines it, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch
from support.model_fixtures import any_modality_config, modality_inputs, randomized, small_config

import flagdit
import flagdit_kernels as fk
from flagdit.model import DEFAULT_ATTENTION_TILE


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _mixed(seed=0, cap_dim=16):
    """Images and videos of odd sizes and tile grids (partial edge tiles), one packed batch."""
    g = torch.Generator().manual_seed(seed)
    xs = [
        torch.randn(3, 5, 10, 14, generator=g, dtype=torch.float64),
        torch.randn(3, 6, 10, generator=g, dtype=torch.float64),
        torch.randn(3, 3, 8, 6, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 2, generator=g, dtype=torch.float64),
    ]
    t = torch.rand(4, generator=g, dtype=torch.float64)
    cap = torch.randn(4, 4, cap_dim, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0]])
    return xs, t, cap, mask


def _model(variant="flag", seed=1, **kw):
    return randomized(flagdit.FlagDiT(small_config(variant), backend="reference", **kw), seed=seed).double()


@pytest.mark.parametrize("variant", ["flag", "next"])
@pytest.mark.parametrize("tile", [(1, 2, 2), (2, 3, 2), (4, 4, 4)])
def test_dense_on_a_tile_major_pack_equals_raster(variant, tile):
    """Outputs and gradients (weights and latents) agree to float64 rounding: only the token order changed."""
    xs, t, cap, mask = _mixed()
    raster = _model(variant)
    tiled = _model(variant, attention_tile=tile)
    results = []
    for model in (raster, tiled):
        model.zero_grad()
        inputs = [x.clone().requires_grad_(True) for x in xs]
        out = model(inputs, t, cap, mask)
        sum((o * torch.sin(o.detach() + i)).sum() for i, o in enumerate(out)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, [x.grad for x in inputs], grads))
    (out_r, dx_r, dw_r), (out_t, dx_t, dw_t) = results
    assert all(_rel(a, b) < 1e-12 for a, b in zip(out_t, out_r))
    assert all(_rel(a, b) < 1e-12 for a, b in zip(dx_t, dx_r))
    # ky_norm.bias shifts every text key alike, which the softmax ignores: its gradient is rounding noise (~1e-15).
    assert dw_t.keys() == dw_r.keys()
    assert all(torch.allclose(dw_t[n], dw_r[n], rtol=1e-10, atol=1e-13) for n in dw_r)


def test_flag_rope_uses_the_raster_index_in_any_order():
    """Flag-DiT's 1D RoPE: the token's index in its sample in raster order, on the tokens where they are packed."""
    model = _model("flag")
    xs = [x.float() for x in _mixed()[0]]
    c = model.config
    raster = fk.pack(xs, c.patch_size, c.nextline, c.nextframe, backend="reference")
    tiled = fk.pack(xs, c.patch_size, c.nextline, c.nextframe, tile=(2, 3, 2), backend="reference")
    freqs_r = model.layout(raster).freqs
    index = torch.cat([torch.arange(n) for n in raster.seqlens])
    assert torch.equal(freqs_r, fk.rope_freqs(c.head_dim, index, theta=c.rope_theta, backend="reference"))
    # The same position gets the same rotation: match tokens of the two packs by (sample, position).
    key = lambda p: [(int(s), *map(int, q)) for s, q in zip(model.layout(p).seqs.sample_index, p.positions)]
    where = {k: i for i, k in enumerate(key(raster))}
    order = torch.tensor([where[k] for k in key(tiled)])
    assert not torch.equal(order, torch.arange(order.shape[0]))  # the packs do differ in order
    assert torch.equal(model.layout(tiled).freqs, freqs_r[order])


@pytest.mark.parametrize("variant", ["flag", "next"])
def test_audio_and_multiview_pack_tile_major_too(variant):
    """Any-modality batches (a 1-channel spectrogram, a multi-view item with cameras): the same outputs."""
    xs, t, cap, mask, modality, cameras = modality_inputs()
    outs = []
    for tile in (None, (2, 2, 3)):
        model = randomized(
            flagdit.FlagDiT(any_modality_config(variant=variant), backend="reference", attention_tile=tile)
        )
        with torch.no_grad():
            outs.append(model(xs, t, cap, mask, modality=modality, cameras=cameras))
    assert all(_rel(a, b) < 1e-5 for a, b in zip(outs[1], outs[0]))


def test_settings_are_attributes_and_bad_ones_are_refused():
    model = flagdit.FlagDiT(small_config(), backend="reference")
    assert model.attention_sparsity is None and model.attention_tile is None and model.pack_tile is None
    model.attention_sparsity = fk.TileSparsity(window=(1, 2, 2))
    assert model.pack_tile == DEFAULT_ATTENTION_TILE  # sparsity needs tiles: the default one
    model.attention_tile = [1, 2, 2]
    assert model.attention_tile == (1, 2, 2) == model.pack_tile
    for bad in ((1, 2), (0, 2, 2), (1, 2.0, 2), (True, 2, 2), "1,2,2"):
        with pytest.raises(ValueError, match="attention_tile must be None or"):
            model.attention_tile = bad
    with pytest.raises(TypeError, match=r"attention_sparsity must be None or a fk\.TileSparsity"):
        flagdit.FlagDiT(small_config(), attention_sparsity=(2, 2, 2))
    assert "attention_sparsity" not in str(model.state_dict().keys())  # not a checkpoint shape property


def test_sequence_parallel_refuses_sparsity():
    from flagdit.parallel.apply import SequenceParallel

    model = flagdit.FlagDiT(small_config(), backend="reference", attention_sparsity=fk.TileSparsity(top_k=2))
    plan = SequenceParallel.__new__(SequenceParallel)  # the check comes before any collective
    xs, t, cap, mask = _mixed()
    with pytest.raises(ValueError, match="does not run sequence-parallel"):
        plan.forward(model, xs, t.float(), cap.float(), mask)


def _masked_reference_core(q, k, v, cu_seqlens, max_seqlen, softmax_scale, *, prefer=None, sparsity, tiles, **text):
    """A block's attention as ``fk.tile_sparse_attention`` (the masked reference) computes it."""
    cu = lambda layout: layout.cu_seqlens if isinstance(layout, fk.VarlenLayout) else layout
    text = dict(text, text_cu_seqlens=cu(text["text_cu_seqlens"]))
    del text["text_max_seqlen"]
    return fk.tile_sparse_attention(q, k, v, cu(cu_seqlens), tiles, sparsity, softmax_scale, **text)[0]


@pytest.mark.parametrize("variant", ["flag", "next"])
@pytest.mark.parametrize("sparsity", [fk.TileSparsity(window=(2, 1, 2)), fk.TileSparsity(top_k=2)])
def test_sparse_model_attends_as_the_masked_reference(variant, sparsity, monkeypatch):
    """Every block gets the sparsity and the pack's tiles: the model equals one whose attention is the masked
    reference, and differs from the dense model (the pattern really drops keys)."""
    xs, t, cap, mask = _mixed(seed=3)
    model = _model(variant, attention_sparsity=sparsity, attention_tile=(1, 2, 2))
    with torch.no_grad():
        sparse = model(xs, t, cap, mask)
        density = float(fk.last_tile_blocks().density)
        model.attention_sparsity = None
        dense = model(xs, t, cap, mask)
        model.attention_sparsity = sparsity
        for layer in model.layers:
            monkeypatch.setattr(layer.attention, "core", _masked_reference_core)
        masked = model(xs, t, cap, mask)
    assert 0 < density < 1
    assert all(_rel(a, b) < 1e-12 for a, b in zip(sparse, masked))
    assert min(_rel(a, b) for a, b in zip(sparse[:3], dense[:3])) > 1e-4  # the three items with several tiles


def test_a_window_over_the_whole_grid_is_dense():
    xs, t, cap, mask = _mixed(seed=4)
    dense = _model("flag")
    sparse = _model("flag", attention_sparsity=fk.TileSparsity(window=(8, 8, 8)), attention_tile=(2, 3, 2))
    with torch.no_grad():
        assert all(_rel(a, b) < 1e-12 for a, b in zip(sparse(xs, t, cap, mask), dense(xs, t, cap, mask)))


def test_a_dense_run_fine_tunes_and_samples_sparse_from_the_command_line(tmp_path, capsys):
    """flagdit-train --resume with --attention-window: the dense checkpoint trains on sparse (recorded in the log
    and the checkpoint's args); flagdit-sample takes the sparse options for any checkpoint."""
    import json

    from flagdit import checkpoint
    from flagdit.cli import sample, train

    small = ["--set", "dim=32", "--set", "n_layers=1", "--set", "n_heads=2", "--batch-size", "2", "--warmup", "1",
             "--no-progress", "--threads", "1", "--log-every", "1", "--modality", "video",
             "--out", str(tmp_path)]  # fmt: skip
    dense = train.train(train.parse_args([*small, "--steps", "1"]))
    sparse_args = ["--attention-window", "2,1,1", "--attention-top-k", "1", "--attention-tile", "1,2,2"]
    tuned = train.train(train.parse_args([*small, "--steps", "3", "--resume", *sparse_args]))
    assert len(dense) == 1 and len(tuned) == 2 and all(map(torch.isfinite, torch.tensor(tuned)))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["attention"] for r in records] == ["dense"] + ["window=2,1,1 top_k=1, tile 1,2,2"] * 2
    args = checkpoint.load_training_checkpoint(tmp_path / "ckpt.pt")["args"]
    assert (args["attention_window"], args["attention_top_k"], args["attention_tile"]) == ([2, 1, 1], 1, [1, 2, 2])
    capsys.readouterr()
    out = tmp_path / "s.png"
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out), "--steps", "1", "--no-progress",
                 "--video-caption", "a red circle on black moving down", "--attention-window", "1,2,2"])  # fmt: skip
    assert "(attention window=1,2,2, tile 4,4,4)" in capsys.readouterr().out
    assert (tmp_path / "s_video.png").exists()


@pytest.mark.slow  # about a minute interpreted on a CPU
@pytest.mark.skipif(
    "triton" not in fk.available_backends("varlen_attention", "cpu"), reason="Triton runs on the CPU only interpreted"
)
def test_sparse_model_on_triton_matches_the_reference():
    """The model's tile-sparse forward and backward (window and top-k together) on the Triton backend (interpreted:
    fp32, two small items, one block) against the reference: outputs and every weight's gradient."""
    sparsity = fk.TileSparsity(window=(2, 1, 2), top_k=1)
    xs, t, cap, mask = _mixed(seed=5)
    xs, t, cap, mask = [xs[0].float(), xs[2].float()], t[[0, 2]].float(), cap[[0, 2]].float(), mask[[0, 2]]
    results = []
    for backend in ("reference", "triton"):
        model = randomized(flagdit.FlagDiT(small_config(n_layers=1), backend=backend), seed=6)
        model.attention_sparsity, model.attention_tile = sparsity, (1, 2, 2)
        out = model(xs, t, cap, mask)
        sum((o * o.detach().sin()).sum() for o in out).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (out_r, grads_r), (out_t, grads_t) = results
    assert all(_rel(a, b) < 1e-4 for a, b in zip(out_t, out_r))
    assert grads_t.keys() == grads_r.keys()
    scale = max(g.norm() for g in grads_r.values())
    assert all((grads_t[n] - grads_r[n]).norm() < 1e-4 * scale for n in grads_r)
