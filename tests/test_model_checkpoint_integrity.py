"""Checkpoint data integrity: our checkpoints carry a checksum that loading verifies; empty, truncated, corrupt,
incomplete and foreign files get one clear error each; writes are atomic and durable."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch
from support.isolated import run_isolated
from support.lumina_checkpoints import make_case

import flagdit
from flagdit import checkpoint, lumina
from flagdit.checkpoint import CheckpointError
from flagdit.cli import train
from flagdit.cli.sample import main as sample_main
from flagdit.configs import FlagDiTConfig

SMALL = FlagDiTConfig(in_channels=3, dim=32, n_layers=1, n_heads=2, multiple_of=16, cap_feat_dim=16, learn_sigma=False)


def _write_training_checkpoint(path, step: int = 3) -> dict:
    """A real flagdit-train checkpoint (model, AdamW state after one step, config, args) written by train.py."""
    torch.manual_seed(0)
    model = flagdit.FlagDiT(SMALL, backend="reference")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()
    args = argparse.Namespace(modality="image", steps=10, lr=1e-3, resume=False)
    train.save_checkpoint(path, model, optimizer, step, SMALL, args, rank=0)
    return model.state_dict()


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "ckpt.pt"
    return path, _write_training_checkpoint(path)


def test_round_trip_verifies_and_returns_the_content(ckpt):
    path, state = ckpt
    loaded = checkpoint.load_training_checkpoint(path)
    assert loaded["format"] == "flagdit-train" and "sha256" not in loaded and loaded["step"] == 3
    assert loaded["config"] == SMALL.to_dict() and loaded["optimizer"]["state"]
    model = checkpoint.model_from_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    raw = torch.load(path, weights_only=True)
    assert len(raw["sha256"]) == 64


def test_a_flipped_byte_in_tensor_data_fails_the_checksum(ckpt):
    path, state = ckpt
    data = bytearray(path.read_bytes())
    weight = state["x_embedder.weight"].numpy().tobytes()
    at = data.find(weight)
    assert at > 0, "the tensor's bytes are stored uncompressed in the file"
    data[at + len(weight) // 2] ^= 0x01  # one bit of one weight: a plausible value, silently loaded before
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        checkpoint.load_training_checkpoint(path)


FUZZ = """
import random, zipfile
from pathlib import Path
from flagdit import checkpoint
path, flipped = Path(PATH), Path(PATH + ".flipped")
good = path.read_bytes()
want = checkpoint.content_sha256(checkpoint.load_training_checkpoint(path))
rng = random.Random(0)
with zipfile.ZipFile(path) as z:
    members = z.infolist()
    directory = z.start_dir
pickle = next(m for m in members if m.filename.endswith("data.pkl"))
headers = [range(m.header_offset, m.header_offset + 30 + len(m.filename)) for m in members]
regions = {  # (byte ranges, how many positions to flip there)
    "pickle": ([range(pickle.header_offset, pickle.header_offset + 64 + pickle.compress_size)], 250),
    "local headers": (headers, 100),
    "central directory": ([range(directory, len(good))], 150),
    "tensor data": ([range(len(good))], 100),
}
outcomes = {}
for name, (ranges, count) in regions.items():
    for _ in range(count):
        at = rng.choice(rng.choice(ranges))
        data = bytearray(good)
        data[at] ^= 1 << rng.randrange(8)
        flipped.write_bytes(bytes(data))
        try:
            got = checkpoint.content_sha256(checkpoint.load_training_checkpoint(flipped))
            kind = "same" if got == want else f"DIFFERENT ({name}, byte {at})"
        except checkpoint.CheckpointError:
            kind = "CheckpointError"
        except Exception as e:
            kind = f"{type(e).__name__} ({name}, byte {at}): {e}"[:300]
        outcomes[kind] = outcomes.get(kind, 0) + 1
report(outcomes)
"""


def test_no_single_bit_flip_anywhere_loads_different_content(ckpt):
    """Flips one bit at 600 positions (the pickle, the zip's local headers and central directory, the tensor
    data): every load either raises a CheckpointError or returns exactly the saved content (a flip in bytes the
    reader ignores). In a child process: a reader crashing on bad bytes fails this test, not the run."""
    path, _ = ckpt
    outcomes = run_isolated(FUZZ.replace("PATH", repr(str(path))), env={"PYTHONWARNINGS": "ignore"})
    assert set(outcomes) <= {"same", "CheckpointError"}, outcomes
    assert outcomes["CheckpointError"] > 0


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_and_empty_files_are_one_clear_error(ckpt, keep):
    path, _ = ckpt
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    match = "is empty" if keep == 0 else "cannot be read as a tensor checkpoint"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load_training_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):
        flagdit.load_lumina(path)


def test_a_checkpoint_without_a_checksum_loads_with_a_warning(ckpt):
    path, _ = ckpt
    old = torch.load(path, weights_only=True)
    for key in ("sha256", "format", "version"):
        del old[key]
    torch.save(old, path)
    with pytest.warns(UserWarning, match="carries no checksum"):
        assert checkpoint.load_training_checkpoint(path)["step"] == 3


def test_a_newer_format_is_refused(ckpt):
    path, _ = ckpt
    body = torch.load(path, weights_only=True)
    del body["sha256"]
    body["version"] = 99
    body["sha256"] = checkpoint.content_sha256(body)
    torch.save(body, path)
    with pytest.raises(CheckpointError, match="version 99"):
        checkpoint.load_training_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_one_clear_error(tmp_path):
    _, sd = make_case("flag")
    body = {"model": sd, "optimizer": {}, "step": 1, "config": SMALL.to_dict(), "args": {}}
    checkpoint.save_training_checkpoint(tmp_path / "a.pt", body)
    with pytest.raises(CheckpointError, match="do not fit its config"):
        checkpoint.model_from_checkpoint(tmp_path / "a.pt")
    body["config"] = {**SMALL.to_dict(), "no_such_field": 1}
    checkpoint.save_training_checkpoint(tmp_path / "b.pt", body)
    with pytest.raises(CheckpointError, match="config is not one this flagdit builds"):
        checkpoint.model_from_checkpoint(tmp_path / "b.pt")


def test_foreign_formats_are_one_clear_error_each(tmp_path, ckpt):
    ours, _ = ckpt
    _, sd = make_case("flag")
    torch.save(sd, tmp_path / "lumina.pth")
    with pytest.raises(CheckpointError, match=r"bare state_dict of .* tensors .*flagdit.load_lumina"):
        checkpoint.load_training_checkpoint(tmp_path / "lumina.pth")
    with pytest.raises(CheckpointError, match="flagdit-train checkpoint, not Lumina weights"):
        flagdit.load_lumina(ours)
    torch.save({"patch_embedder.proj.weight": torch.zeros(4, 4)}, tmp_path / "diffusers.pth")
    with pytest.raises(CheckpointError, match=r"lacks \['x_embedder.weight'"):
        flagdit.load_lumina(tmp_path / "diffusers.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        flagdit.load_lumina(tmp_path / "list.pth")
    torch.save({"x_embedder.weight": torch.zeros(2), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(CheckpointError, match=r"\['step'\] are not tensors"):
        flagdit.load_lumina(tmp_path / "mixed.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="cannot be read"):
        flagdit.load_lumina(tmp_path / "text.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        flagdit.load_lumina(tmp_path / "bad.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"config": {}, "model": Evil()}))
    with pytest.raises(CheckpointError, match="never unpickled"):
        checkpoint.load_training_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_training_checkpoint(tmp_path / "none.pt")


def test_model_parallel_shards_must_all_be_there(tmp_path):
    _, sd = make_case("flag-gqa-noqk")
    torch.save(sd, tmp_path / "consolidated.00-of-02.pth")
    with pytest.raises(CheckpointError, match=r"holds 1 of the 2 model-parallel shards: missing \['consolidated.01"):
        flagdit.load_lumina(tmp_path)
    torch.save(sd, tmp_path / "consolidated.01-of-03.pth")
    with pytest.raises(CheckpointError, match=r"mixes shard counts \[2, 3\]"):
        lumina.read_state_dict(tmp_path)
    (tmp_path / "consolidated.01-of-03.pth").unlink()
    torch.save({k: v for k, v in sd.items() if k != "pad_token"}, tmp_path / "consolidated.01-of-02.pth")
    with pytest.raises(CheckpointError, match="shard 1 holds other keys than shard 0"):
        lumina.read_state_dict(tmp_path)


def test_flagdit_sample_names_what_a_foreign_file_is(tmp_path, capsys):
    _, sd = make_case("flag")
    torch.save(sd, tmp_path / "lumina.pth")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, message in (("lumina.pth", "flagdit.load_lumina"), ("empty.pt", "is empty")):
        with pytest.raises(SystemExit) as exit:
            sample_main(["--ckpt", str(tmp_path / name), "--out", str(tmp_path / "x.png"), "--no-progress"])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and "flagdit-sample: error: --ckpt:" in err and message in err, err


def test_resume_from_a_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path, ckpt, capsys):
    path, state = ckpt
    data = bytearray(path.read_bytes())
    at = data.find(state["final_layer.linear.weight"].numpy().tobytes())
    data[at] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit:
        train.main(["--out", str(path.parent), "--resume", "--steps", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert exit.value.code == 1 and err.startswith("flagdit-train: error: ") and "fails its checksum" in err, err
    assert path.read_bytes() == bytes(data)  # nothing overwrote it


def test_writes_are_atomic_and_fsynced_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    _write_training_checkpoint(path, step=1)
    before = path.read_bytes()

    def torn(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, torn)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("rename") or real_replace(a, b))
    _write_training_checkpoint(path, step=2)
    assert events == ["fsync", "rename", "fsync"]  # the file, the rename, the directory
    assert checkpoint.load_training_checkpoint(path)["step"] == 2
