"""The long-context plan checked by arithmetic (the numbers: flagdit.parallel.plan; the document:
flagdit.cli.long_context_plan): the document is what the script writes, its FLOP count is torch's count of a
real block, its parameter counts agree with the config's, and its memory and traffic figures add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flagdit
from flagdit.cli import long_context_plan
from flagdit.configs import get_config
from flagdit.parallel import plan

ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


@pytest.fixture(scope="module")
def model7b() -> plan.Model:
    return plan.Model.of(get_config("flag-dit-7b"))


def test_the_document_is_what_the_script_writes():
    assert (ROOT / "LONG_CONTEXT.md").read_text() == long_context_plan.render(), (
        "run: python -m flagdit.cli.long_context_plan --write LONG_CONTEXT.md"
    )


@pytest.mark.parametrize("variant", ["flag", "next"])
def test_block_flops_equal_torchs_count_of_a_real_block(variant):
    config = get_config("tiny", dim=64, n_heads=4, n_kv_heads=2, n_layers=1, cap_feat_dim=24, variant=variant)
    model = flagdit.FlagDiT(config, backend="reference")
    xs = [torch.randn(3, 6, 10), torch.randn(3, 2, 4, 6), torch.randn(3, 2, 4)]
    caption = [3, 0, 5]
    mask = (torch.arange(5)[None] < torch.tensor(caption)[:, None]).long()
    inputs = model.prepare(xs, torch.rand(3), torch.randn(3, 5, 24), mask)
    h, adaln = model.embed_rows(inputs)
    with FlopCounterMode(display=False) as counter:
        model.layers[0](h, inputs.layout, inputs.text, None, adaln)
    flops = plan.block_forward_flops(config, inputs.packed.seqlens, caption)
    assert counter.get_total_flops() == flops["gemm"] + flops["attention"]


def test_parameter_counts_agree_with_the_config(model7b):
    assert model7b.params == model7b.config.num_params()
    assert 0.9 * model7b.params < model7b.config.n_layers * model7b.block_params < model7b.params


def test_memory_parts_add_up_and_the_headline_holds(model7b):
    run = plan.Run(8, 8, "ulysses", checkpointing="block")
    m = plan.memory(model7b, run)
    assert m["total"] == pytest.approx(m["states"] + m["fsdp"] + m["activations"] + m["workspace"])
    assert m["states"] == 16 * model7b.params / 8
    n, d = 131072 / 8, 4096
    everything = sum(b for _, b in plan.saved_per_token(model7b, replace(run, checkpointing="none")))
    # every block's input, and the rest of one block while its backward recomputes it
    assert m["activations"] == 32 * n * d * 2 + n * (everything - d * 2)
    assert m["fits"] and m["total"] < 139 * GIB  # 128K tokens of Flag-DiT 7B train on one node with AC
    # The ring keeps O(T/P) per block, about what Ulysses keeps (it held all P key/value blocks before).
    ring = plan.memory(model7b, replace(run, strategy="ring", checkpointing="none"))
    ulysses = plan.memory(model7b, replace(run, checkpointing="none"))
    assert ring["activations"] < 1.1 * ulysses["activations"]


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
@pytest.mark.parametrize("checkpointing", ["none", "block", "selective"])
def test_largest_context_is_the_edge_of_the_memory(model7b, strategy, checkpointing):
    run = plan.Run(8, 8, strategy, checkpointing)
    longest = plan.largest_context(model7b, run)
    assert longest % 1024 == 0 and longest > 0
    assert plan.memory(model7b, replace(run, tokens=longest))["fits"]
    assert not plan.memory(model7b, replace(run, tokens=longest + 1024))["fits"]


def test_traffic_and_time_by_hand(model7b):
    n, d = 131072 / 8, 4096
    ulysses = plan.block_traffic(model7b, plan.Run(8, 8, "ulysses"))
    assert ulysses["sp_bytes"] == 7 / 8 * n * 4 * d * 2  # q, k, v out and the output back, bf16
    assert ulysses["sp_seconds"] == ulysses["sp_bytes"] / 450e9
    ring = plan.block_traffic(model7b, plan.Run(8, 8, "ring"))
    assert ring["sp_bytes"] == 7 * n * 2 * d * 2  # 7 hops of this rank's k and v
    t = plan.step_time(model7b, plan.Run(8, 8, "ulysses"))
    attention = 4 * 131072**2 * d * 32 * (2 + 2.5)  # self-attention FLOPs dominate at 128K
    assert t["compute"] > attention / 355e12 / 8
    assert t["total"] == pytest.approx(t["compute"] + t["exposed_sp"] + t["exposed_fsdp"])


MEASURE = """
import json, sys, torch, flagdit
from flagdit.configs import get_config
from flagdit.memory import SavedBytes
config = get_config("tiny", dim=128, n_heads=4, n_kv_heads=2, n_layers=1, cap_feat_dim=32)
torch.manual_seed(0)
model = flagdit.FlagDiT(config, backend="triton").to(torch.bfloat16)
def saved(side, checkpointing):
    model.checkpointing = checkpointing
    inputs = model.prepare([torch.randn(3, side, side)], torch.rand(1), torch.randn(1, 5, 32), torch.ones(1, 5))
    h, adaln = model.embed_rows(inputs)
    h = h.detach().requires_grad_()
    with SavedBytes(model) as s:
        out = model.layers[0](h, inputs.layout, inputs.text, None, adaln.detach())
    nbytes = s.bytes
    out.float().sum().backward()
    return h.shape[0], nbytes
result = {}
for mode in ("none", "block", "selective"):
    (t1, b1), (t2, b2) = saved(8, mode), saved(16, mode)
    result[mode] = (b2 - b1) / (t2 - t1)  # bytes per token: the per-batch terms cancel
print(json.dumps(result))
"""


def test_the_inventory_is_what_a_real_block_saves():
    """A real block (bf16, the Triton kernels, interpreted on a CPU) measured by saved-tensor hooks at two token
    counts: the bytes per token agree with the plan's inventory within 10% in every checkpointing mode."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    model = plan.Model.of(get_config("tiny", dim=128, n_heads=4, n_kv_heads=2, n_layers=1, cap_feat_dim=32))
    single_process = plan.Run(1, 1, "ulysses")  # at sp 1 Ulysses is the plain kernel call
    for mode in ("none", "block", "selective"):
        bytes_per_token = sum(b for _, b in plan.saved_per_token(model, replace(single_process, checkpointing=mode)))
        assert abs(measured[mode] - bytes_per_token) <= 0.1 * bytes_per_token, (mode, measured, bytes_per_token)


def test_the_gpu_memory_check_runs_and_predicts_the_checkpointed_block(tmp_path):
    """python -m flagdit.parallel.measure (benchmarks/gpu_check.sh --phases memory) on the CPU at a tiny size:
    one record per case; with block checkpointing a block saves its bf16 input, as the plan says (the caption's
    few per-batch bytes aside). Without, the reference attention saves its score matrices, not the kernel's
    inventory: that comparison is the GPU's."""
    from flagdit.parallel import measure

    log = tmp_path / "results.jsonl"
    measure.main(["--config", "tiny", "--tokens", "64", "--backend", "reference", "--jsonl", str(log)])
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kind"], r["checkpointing"]) for r in records] == [("memory", m) for m in ("none", "block", "selective")]
    block = records[1]
    assert block["tokens"] == 64 and block["predicted_saved_bytes"] == 64 * 128 * 2
    assert abs(block["saved_bytes"] - block["predicted_saved_bytes"]) <= 0.05 * block["predicted_saved_bytes"]
    assert records[0]["saved_bytes"] > 10 * block["saved_bytes"]
    with pytest.raises(SystemExit):
        measure.main(["--modes", "full"])
