"""``flagdit.load_lumina``: Lumina checkpoint files (.pth, safetensors, consolidated model-parallel shards)."""

from __future__ import annotations

import pickle

import pytest
import torch
from support.lumina_checkpoints import inputs, make_case

import flagdit
from flagdit.checkpoint import CheckpointError
from flagdit.lumina import infer_config, merge_shards, read_state_dict


def _same_outputs(model, cfg, sd):
    """The loaded model computes exactly what a model built from cfg with the same weights and kernels does."""
    ref = flagdit.FlagDiT(cfg, backend=model.backend)
    ref.load_state_dict(sd, strict=True)
    xs, t, cap, mask = inputs(cfg)
    with torch.no_grad():
        for a, b in zip(model(xs, t, cap, mask), ref(xs, t, cap, mask)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["flag", "next"])
def test_pth_file_with_inferred_config(tmp_path, name):
    cfg, sd = make_case(name)
    path = tmp_path / "consolidated.00-of-01.pth"
    torch.save(sd, path)
    model = flagdit.load_lumina(path)
    got = model.config
    assert (got.variant, got.dim, got.n_layers, got.n_heads, got.kv_heads, got.qk_norm, got.learn_sigma) == (
        cfg.variant, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.qk_norm, cfg.learn_sigma
    )  # fmt: skip
    assert got.ffn_dim == cfg.ffn_dim and got.nextline == cfg.nextline and not got.nextframe
    _same_outputs(model, cfg, sd)
    # A directory of consolidated shards, EMA preferred when present.
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save(ema, tmp_path / "consolidated_ema.00-of-01.pth")
    assert torch.equal(read_state_dict(tmp_path)["pad_token"], ema["pad_token"])
    assert torch.equal(read_state_dict(tmp_path, ema=False)["pad_token"], sd["pad_token"])


def test_safetensors_and_wrapped_dicts(tmp_path):
    from safetensors.torch import save_file

    cfg, sd = make_case("next")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    _same_outputs(flagdit.load_lumina(tmp_path / "model.safetensors"), cfg, sd)
    _same_outputs(flagdit.load_lumina(tmp_path), cfg, sd)  # a directory of safetensors files
    # {"model": state_dict} with DDP "module." prefixes.
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "step": 3}, tmp_path / "ckpt.pth")
    _same_outputs(flagdit.load_lumina(tmp_path / "ckpt.pth"), cfg, sd)


def test_model_parallel_shards_merge(tmp_path):
    """fairscale column-parallel weights split on dim 0, row-parallel on dim 1; merging restores them."""
    cfg, sd = make_case("flag-gqa-noqk")
    col = ("wq", "wk", "wv", "wk_y", "wv_y", "w1", "w3", "gate", "adaLN_modulation", "x_embedder", "mlp.0",
           "cap_embedder.1", "final_layer.linear")  # fmt: skip
    row = ("wo.", "w2.", "mlp.2.weight")
    shards = [{}, {}]
    for k, v in sd.items():
        if any(s in k for s in row) and v.dim() == 2:
            parts = v.chunk(2, dim=1)
        elif any(s in k for s in col):
            parts = v.chunk(2, dim=0)
        else:
            parts = (v, v)
        for shard, part in zip(shards, parts):
            shard[k] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}-of-02.pth")
    merged = read_state_dict(tmp_path)
    assert all(torch.equal(merged[k], sd[k]) for k in sd)
    _same_outputs(flagdit.load_lumina(tmp_path), cfg, sd)
    # Per-shard QK LayerNorm cannot be merged into one model.
    _, sd_qk = make_case("flag")
    with pytest.raises(ValueError, match="normalizes each shard's heads separately"):
        merge_shards([sd_qk, sd_qk])


def test_rejects_mismatched_and_unsafe_files(tmp_path):
    cfg, sd = make_case("flag")
    bad = dict(sd)
    bad["layers.0.attention.extra"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"unexpected \['layers.0.attention.extra'\]"):
        flagdit.load_lumina(tmp_path / "bad.pth", config=cfg)
    missing = dict(sd)
    del missing["eol_token"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing \['eol_token'\]"):
        flagdit.load_lumina(tmp_path / "missing.pth", config=cfg)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="Unsupported global"):
        flagdit.load_lumina(tmp_path / "evil.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither consolidated"):
        flagdit.load_lumina(tmp_path / "empty")


def test_infer_config_overrides():
    _, sd = make_case("next")
    cfg = infer_config(sd, norm_eps=1e-6)
    assert cfg.norm_eps == 1e-6 and cfg.variant == "next" and cfg.n_kv_heads == 2


def test_ambiguous_checkpoint_directories_are_refused_naming_both_files(tmp_path):
    from safetensors.torch import save_file

    _, sd = make_case("flag")
    shards = tmp_path / "shards"
    shards.mkdir()
    torch.save(sd, shards / "consolidated.00-of-01.pth")
    torch.save({k: v + 1 for k, v in sd.items()}, shards / "consolidated.0-of-1.pth")  # the same rank, other weights
    with pytest.raises(CheckpointError, match=r"two files for model-parallel shard 0: consolidated\.0"):
        read_state_dict(shards)
    with pytest.raises(CheckpointError, match=r"consolidated\.00-of-01\.pth") as error:
        flagdit.load_lumina(shards)
    assert "consolidated.0-of-1.pth" in str(error.value)
    split = tmp_path / "split"
    split.mkdir()
    keys = sorted(sd)
    save_file({k: sd[k].contiguous() for k in keys[: len(keys) // 2]}, str(split / "a.safetensors"))
    save_file({k: sd[k].contiguous() for k in keys[len(keys) // 2 :]}, str(split / "b.safetensors"))
    assert read_state_dict(split).keys() == sd.keys()  # disjoint files join
    save_file({keys[0]: sd[keys[0]].contiguous() + 1}, str(split / "c.safetensors"))
    with pytest.raises(CheckpointError, match=r"a\.safetensors and c\.safetensors both hold 1 of the same tensors"):
        read_state_dict(split)
