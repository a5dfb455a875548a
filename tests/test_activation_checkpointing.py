"""Activation checkpointing (FlagDiT(checkpointing=...), flagdit-train --activation-checkpointing) and the measured
memory (flagdit.memory.SavedBytes, log.jsonl's saved_bytes): the same outputs and gradients in every mode, and
what a step saves shrinks as the mode says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flagdit
from flagdit.configs import get_config
from flagdit.memory import SavedBytes

ROOT = Path(__file__).resolve().parents[1]


def _model(variant: str, mode: str, layers: int = 2, **sizes) -> flagdit.FlagDiT:
    extra = {"nextline": False} if variant == "next" else {}
    config = get_config("tiny", n_layers=layers, variant=variant, **{**extra, **sizes})
    torch.manual_seed(0)
    model = flagdit.FlagDiT(config, checkpointing=mode)
    with torch.no_grad():  # zero-initialized layers would hide errors
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch(cap_dim: int, hw: int = 6):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, hw, hw + 4, generator=g), torch.randn(3, 3, 4, 6, generator=g)]
    cap = torch.randn(2, 5, cap_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return xs, torch.rand(2, generator=g), cap, mask


def _step(model, batch):
    """Output, saved bytes and every gradient (parameters and inputs) of a loss over the output."""
    xs, t, cap, mask = batch
    xs = [x.clone().requires_grad_() for x in xs]
    cap = cap.clone().requires_grad_()
    with SavedBytes(model) as saved:
        out = model(xs, t, cap, mask)
        loss = sum((o * o.detach().roll(1)).sum() for o in out)
    nbytes = saved.bytes
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads |= {f"x{i}": x.grad for i, x in enumerate(xs)} | {"cap": cap.grad}
    return torch.cat([o.detach().flatten() for o in out]), nbytes, grads


@pytest.mark.parametrize("variant", ["flag", "next"])
@pytest.mark.parametrize("mode", ["block", "selective"])
def test_checkpointing_gives_the_same_outputs_and_gradients(variant, mode):
    sizes = dict(dim=64, n_heads=4, n_kv_heads=2, cap_feat_dim=24)
    batch = _batch(24)
    out, plain_bytes, grads = _step(_model(variant, "none", **sizes), batch)
    out_ac, ac_bytes, grads_ac = _step(_model(variant, mode, **sizes), batch)
    torch.testing.assert_close(out_ac, out, rtol=0, atol=0)  # the same ops on the same inputs: bitwise
    assert grads_ac.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_ac[name], g, rtol=1e-6, atol=1e-7, msg=name)
    assert 0 < ac_bytes < plain_bytes


@pytest.mark.slow  # about 40 s of dynamo tracing on a CPU
def test_checkpointing_under_torch_compile_gives_the_eager_gradients():
    sizes = dict(dim=64, n_heads=4, n_kv_heads=2, cap_feat_dim=24)
    xs, t, cap, mask = _batch(24)

    def grads(model, fn):
        out = fn(xs, t, cap, mask)
        sum((o * o).sum() for o in out).backward()
        return torch.cat([o.detach().flatten() for o in out]), torch.cat([p.grad.flatten() for p in model.parameters()
                                                                          if p.grad is not None])  # fmt: skip

    eager = _model("flag", "none", layers=1, **sizes)
    out, g = grads(eager, eager)
    for mode in ("block", "selective"):
        torch._dynamo.reset()
        model = _model("flag", mode, layers=1, **sizes)
        out_c, g_c = grads(model, torch.compile(model, backend="aot_eager"))
        torch.testing.assert_close(out_c, out, rtol=1e-6, atol=1e-6)
        assert ((g_c - g).norm() / g.norm()).item() < 1e-6, mode  # AOTAutograd's decompositions round alike


def test_block_checkpointing_saves_under_a_third_of_none_and_selective_lies_between():
    """The target of issue 24 on the tiny config (4 layers): block <= 0.3x of none."""
    batch = _batch(64, hw=16)
    saved = {mode: _step(_model("flag", mode, layers=4), batch)[1] for mode in ("none", "block", "selective")}
    assert saved["block"] <= 0.3 * saved["none"], saved
    assert saved["block"] < saved["selective"] < saved["none"], saved


def test_saved_bytes_counts_each_storage_once_and_no_parameter():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(16, 8, requires_grad=True)
    model = torch.nn.Module()
    model.w = w
    with SavedBytes(model) as saved:
        h = x @ w  # saves x and w (a parameter: not counted)
        y = h.sin()  # saves h
        z = (h[:8] * h[8:]).sum()  # saves two views of h: h's storage, already counted
    assert saved.bytes == x.nbytes + h.nbytes
    (y.sum() + z).backward()
    with SavedBytes() as unexcluded:
        _ = (x @ w).sum()
    assert unexcluded.bytes == x.nbytes + w.nbytes


def test_saved_bytes_leaves_no_reference_cycle():
    """The pack hook must not hand autograd the tensor itself: an output saved by its own node would then keep
    itself and its graph alive in a cycle (a forward whose backward never runs) until the garbage collector."""
    import gc
    import weakref

    gc.disable()
    try:
        x = torch.randn(64, 8, requires_grad=True)
        with SavedBytes() as saved:
            y = x.exp()  # exp saves its output
        assert saved.bytes == y.nbytes
        alive = weakref.ref(y)
        del y
        assert alive() is None
    finally:
        gc.enable()


def test_checkpointing_mode_is_checked():
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        flagdit.FlagDiT("tiny", checkpointing="full")
    model = flagdit.FlagDiT("tiny")
    model.checkpointing = "selective"
    assert all(layer.checkpointing == "selective" for layer in model.layers)


ARGS = ["--steps", "3", "--batch-size", "2", "--set", "n_layers=4", "--no-progress", "--threads", "1",
        "--log-every", "1", "--warmup", "1", "--lr", "3e-3", "--video-fraction", "0.5"]  # fmt: skip


def _train(out: Path, mode: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "flagdit.cli.train", "--out", str(out), *ARGS, "--activation-checkpointing", mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_flagdit_train_block_checkpointing_same_losses_and_under_a_third_of_the_saved_bytes(tmp_path):
    pytest.importorskip("librosa", reason="flagdit-train's data sets import librosa")
    plain, block = _train(tmp_path / "none", "none"), _train(tmp_path / "block", "block")
    assert [r["step"] for r in block] == [r["step"] for r in plain] == [1, 2, 3]
    for a, b in zip(block, plain):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a, b)
        assert 0 < a["saved_bytes"] <= 0.3 * b["saved_bytes"], (a, b)
    assert plain[-1]["loss"] != plain[0]["loss"]  # the weights moved
