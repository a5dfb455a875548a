"""The long-context plan for Flag-DiT 7B on H200s as a Markdown document: memory and time per GPU, by the
arithmetic of flagdit.parallel.plan. Printed, or written with --write LONG_CONTEXT.md, the document the repository
keeps (tests/test_parallel_plan.py checks that the file is what this writes)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from itertools import product
from pathlib import Path

from ..configs import get_config
from ..model import CHECKPOINTING
from ..parallel.plan import (
    ATTENTION_BACKWARD,
    GEMM_BACKWARD,
    GIB,
    Hardware,
    Model,
    Run,
    block_traffic,
    largest_context,
    memory,
    saved_per_token,
    step_flops,
    step_time,
)

RUNS = [
    Run(8, 8),
    Run(16, 8),
    Run(16, 16),
    Run(32, 8),
    Run(32, 32),
]

OVERLAP = """\
- **FSDP2**: the all-gather of block i+1's bf16 weights runs during block i's compute (forward and backward
  prefetch), the reduce-scatter of block i's gradients during block i-1's backward. At these lengths a
  block's compute (tens of ms) dwarfs both, even across nodes.
- **Ulysses**: both all-to-alls sit on the critical path (attention needs the whole sequence of its heads,
  wo needs every head of its tokens); nothing hides them. They are a few percent of the block at 128K.
- **Ring**: each step's key/value block is sent while the step's attention runs (`RingHop`, posted before
  the kernels, waited for after them), in the forward and again in the backward, where each block's dk/dv
  (fp32) follow one hop behind and are waited for only when the next step adds to them.
- **Everything else** (norms, modulation, RoPE, FFN) is token-local: no communication.
"""


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _table(header: list[str], align: list[str], rows: list[list]) -> list[str]:
    """A markdown table; ``align`` is ``"l"`` or ``"r"`` per column."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _inventory(model: Model) -> list[str]:
    ulysses, ring = (saved_per_token(model, Run(8, 8, s, "none")) for s in ("ulysses", "ring"))
    common = [name for name, _ in ulysses if name in dict(ring)]
    rows = [[name, f"{b:,.0f}", f"{b:,.0f}"] for name, b in ulysses if name in common]
    rows += [[name, f"{b:,.0f}", ""] for name, b in ulysses if name not in common]
    rows += [[name, "", f"{b:,.0f}"] for name, b in ring if name not in common]
    rows.append(["**total**", *(f"**{sum(b for _, b in inv):,.0f}**" for inv in (ulysses, ring))])
    return _table(["tensor", "Ulysses", "ring (sp 8)"], ["l", "r", "r"], rows)


def _memory_table(model: Model, hw: Hardware) -> list[str]:
    rows = []
    for base in RUNS:
        for strategy in ("ulysses", "ring"):
            for ac in CHECKPOINTING:
                run = replace(base, strategy=strategy, checkpointing=ac)
                m = memory(model, run, hw)
                parts = [_gib(m[k]) for k in ("states", "fsdp", "activations", "workspace", "total")]
                fits = "yes" if m["fits"] else "**no**"
                rows.append([run.gpus, f"{run.sp} x {run.dp}", strategy, ac, *parts, fits])
    header = ["GPUs", "sp x dp", "attention", "AC", "params+grads+AdamW", "FSDP gathered", "activations",
              "backward workspace", "total", f"fits {hw.hbm_gib:.0f} GiB"]  # fmt: skip
    return _table(header, ["r", "l", "l", "l", "r", "r", "r", "r", "r", "l"], rows)


def _time_table(model: Model, hw: Hardware) -> list[str]:
    rows = []
    for base in RUNS:
        for strategy, ac in product(("ulysses", "ring"), ("block", "selective")):
            run = replace(base, strategy=strategy, checkpointing=ac)
            t, traffic = step_time(model, run, hw), block_traffic(model, run, hw)
            tflop = sum(step_flops(model, run).values()) / run.sp / 1e12
            rows.append([
                run.gpus, f"{run.sp} x {run.dp}", strategy, ac, f"{tflop:,.0f}", f"{t['compute']:.1f}",
                f"{t['block_forward'] * 1e3:.0f}", f"{traffic['sp_bytes'] / 2**20:,.0f}",
                f"{traffic['sp_seconds'] * 1e3:.1f}", f"{traffic['gather_seconds'] * 1e3:.1f}",
                f"{t['exposed_sp'] + t['exposed_fsdp']:.2f}", f"{t['total']:.1f}", f"{t['tokens_per_gpu_second']:,.0f}",
            ])  # fmt: skip
    header = ["GPUs", "sp x dp", "attention", "AC", "TFLOP per GPU", "compute s", "block fwd ms", "sp MiB / block",
              "sp ms / block", "FSDP gather ms", "exposed comm s", "step s", "tokens/s per GPU"]  # fmt: skip
    return _table(header, ["r", "l", "l", "l"] + ["r"] * 9, rows)


def _largest_table(model: Model, hw: Hardware) -> list[str]:
    rows = []
    for strategy in ("ulysses", "ring"):
        for ac in CHECKPOINTING:
            run = Run(8, 8, strategy, ac)
            at = replace(run, tokens=largest_context(model, run, hw))
            total, seconds = memory(model, at, hw)["total"], step_time(model, at, hw)["total"]
            rows.append([strategy, ac, f"{at.tokens:,}", _gib(total), f"{seconds:,.0f}"])
    header = ["attention", "AC", "largest sample (tokens)", "memory GiB", "step s at that length"]
    return _table(header, ["l", "l", "r", "r", "r"], rows)


def render(config_name: str = "flag-dit-7b", hw: Hardware | None = None) -> str:
    """The plan as a markdown document (on :class:`Hardware`'s H200 figures unless ``hw`` is given)."""
    hw = Hardware() if hw is None else hw
    model = Model.of(get_config(config_name))
    c, k = model.config, RUNS[0].tokens // 1024
    best = largest_context(model, Run(8, 8, "ulysses", "block"), hw)
    selective_memory = memory(model, Run(8, 8, "ulysses", "selective"), hw)["total"]
    block_step, selective_step = (
        step_time(model, Run(8, 8, "ulysses", ac), hw)["total"] for ac in ("block", "selective")
    )
    net, mm, attn = (f"{x:.0f}" for x in (hw.network_gbs, hw.matmul_tflops, hw.attention_tflops))
    head = f"""# Long context: memory and time per GPU for Flag-DiT 7B on H200s

Generated by `python -m flagdit.cli.long_context_plan --write LONG_CONTEXT.md` (arithmetic, checked by
`tests/test_parallel_plan.py`): predictions for a plan, not measurements; GPU figures are still to be
measured.

## Assumptions

- Model `{config_name}`: dim {c.dim}, {c.n_layers} blocks, {c.n_heads} heads of {c.head_dim} ({c.kv_heads} kv heads),
  FFN {c.ffn_dim}, captions {c.cap_feat_dim} wide: {model.params / 1e9:.2f} B parameters as built here
  ({model.block_params / 1e6:.1f} M per block: the text keys/values and adaLN of every block count too).
- H200: {hw.hbm_gib:.0f} GiB usable HBM; NVLink {hw.nvlink_gbs:.0f} GB/s per GPU per direction
  ({2 * hw.nvlink_gbs:.0f} GB/s bidirectional) within a node of {hw.gpus_per_node}; across nodes {net} GB/s per GPU
  per direction (assumed: one 400 Gb/s InfiniBand NIC per GPU); bf16 matmul {mm} TFLOP/s and flash
  attention {attn} TFLOP/s (measured, DESIGN.md) as the rates of every GEMM and every attention FLOP.
- Training: one sample of T tokens per sequence-parallel group and step (+ a {RUNS[0].caption_tokens}-token caption),
  bf16 compute with fp32 master weights, gradients and AdamW state sharded by FSDP2 over all GPUs
  (16 bytes per parameter; bf16 weights gathered per block, one block prefetched); activation
  checkpointing (AC, `flagdit-train --activation-checkpointing`): `block` keeps each block's input and
  recomputes the block in the backward; `selective` keeps the block's input, the attention's tensors (q, k, v,
  outputs, LSEs) and wo's input, and recomputes the rest (norms, projections, RoPE, FFN: GEMMs, no attention,
  no sequence-parallel exchange); `none` keeps everything.
- Time = GEMM FLOPs / matmul rate + attention FLOPs / attention rate (backward {GEMM_BACKWARD:g}x and
  {ATTENTION_BACKWARD:g}x the forward) + the communication no compute hides; norms and other memory-bound ops are
  left out, so these are floors.
- What autograd keeps per token and block is the inventory below, as `flagdit-train --bf16 --dist fsdp`
  runs (FSDP2 gathers bf16 weights, so the residual stream is bf16). `tests/test_parallel_plan.py` measures a
  real block's saved bytes (saved-tensor hooks, `flagdit.memory.SavedBytes`, Triton kernels, bf16) at a small
  size and holds this inventory to it within 10%, in each checkpointing mode. The ring's backward adds a
  workspace of one step (fp32 dq and dk/dv, two key/value blocks, one recomputed output) and recomputes each
  step's attention forward.

## What autograd keeps per local token and block (bytes)

"""
    body = [
        *_inventory(model),
        "",
        f"## Memory per GPU at {k}K tokens (GiB)",
        "",
        *_memory_table(model, hw),
        "",
        f"## Time per step at {k}K tokens (with AC)",
        "",
        "Per block: the sequence-parallel bytes each GPU sends in the forward (the backward sends as much",
        "again; the ring three times as much, its dk/dv travel in fp32) and their time on the links, against the",
        "block's forward compute per GPU.",
        "",
        *_time_table(model, hw),
        "",
        "## Which communication overlaps which compute",
        "",
        OVERLAP,
        "## The largest context on one 8-GPU node (sp 8)",
        "",
        *_largest_table(model, hw),
        "",
        f"With Ulysses and per-block activation checkpointing one node holds one sample of {best:,} tokens",
        f"(about {best / 2**20:.2f} M); a step at that length takes the attention's quadratic FLOPs, not memory.",
        f"At {k}K tokens selective checkpointing fits as well ({_gib(selective_memory)} GiB per GPU with Ulysses) and",
        f"skips the attention's recomputation: {selective_step:.1f} s per step against {block_step:.1f} s with block.",
        "",
    ]
    return head + "\n".join(body)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m flagdit.cli.long_context_plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", metavar="PATH", help="write the markdown document here instead of printing it")
    args = p.parse_args(argv)
    text = render()
    if args.write:
        Path(args.write).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
