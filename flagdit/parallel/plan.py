"""The plan on paper: memory and time per GPU for Flag-DiT at long context on H200s, by arithmetic.

The numbers only: :func:`one_block` is what ``flagdit.parallel.measure`` holds a real block to, and the
document the repository keeps (LONG_CONTEXT.md) is written from these by ``python -m
flagdit.cli.long_context_plan``. tests/test_parallel_plan.py checks the arithmetic: the FLOP count against
torch's FLOP counter on a real block, the memory sums, the largest context.

Everything is derived from the model config (parameter counts from the model built on the meta device) and
the :class:`Hardware` figures; the inventory of what autograd keeps per token is :func:`saved_per_token`.
These are floors and estimates for a plan, not measurements: GPU figures are still to be measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..configs import FlagDiTConfig

GIB = 1 << 30
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Hardware:
    """One H200 in an 8-GPU HGX node (figures from DESIGN.md where measured; the network is an assumption)."""

    hbm_gib: float = 139.0  # usable HBM3e per GPU (141 GB on the box)
    nvlink_gbs: float = 450.0  # NVLink 4 through NVSwitch, per GPU per direction (900 GB/s bidirectional)
    network_gbs: float = 50.0  # across nodes, per GPU per direction: one 400 Gb/s InfiniBand NIC per GPU (assumed)
    gpus_per_node: int = 8
    matmul_tflops: float = 796.0  # bf16 GEMM 8192^3, measured
    attention_tflops: float = 355.0  # bf16 flash attention forward, H32 D128 (SDPA flash), measured


@dataclass(frozen=True)
class Run:
    """One training configuration: ``gpus`` = dp x sp, one ``tokens``-long sample per sequence-parallel group
    and step (plus its caption), FSDP2 over all GPUs, bf16 compute, activation checkpointing ``"none"``,
    ``"block"`` or ``"selective"`` (``FlagDiT(checkpointing=...)``)."""

    gpus: int
    sp: int
    strategy: str = "ulysses"  # or "ring"
    checkpointing: str = "block"
    tokens: int = 131072
    caption_tokens: int = 256

    @property
    def dp(self) -> int:
        return self.gpus // self.sp

    @property
    def local_tokens(self) -> float:
        return self.tokens / self.sp


@dataclass(frozen=True)
class Model:
    """The sizes the plan needs, from a config."""

    config: FlagDiTConfig
    params: int  # the whole model
    block_params: int  # one transformer block

    @classmethod
    def of(cls, config: FlagDiTConfig) -> Model:
        from ..model import FlagDiT

        with torch.device("meta"):
            model = FlagDiT(config)
        return cls(config, sum(p.numel() for p in model.parameters()),
                   sum(p.numel() for p in model.layers[0].parameters()))  # fmt: skip

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def kv_dim(self) -> int:
        return self.config.kv_heads * self.config.head_dim


# ---- FLOPs ------------------------------------------------------------------------------------------------


def block_forward_flops(config: FlagDiTConfig, lengths: list[int], caption_lengths: list[int]) -> dict[str, int]:
    """Matmul FLOPs of one block's forward over a packed batch: ``gemm`` (projections, FFN, adaLN, the caption's
    keys/values) and ``attention`` (q k^T and p v, self within each sample and over its caption)."""
    c = config
    d, kv, f, y, a = c.dim, c.kv_heads * c.head_dim, c.ffn_dim, c.cap_feat_dim, c.adaln_dim
    tokens, text = sum(lengths), sum(caption_lengths)
    n_mod = 6 if c.variant == "flag" else 4
    gemm = 2 * tokens * (d * d + 2 * d * kv + d * d + 3 * d * f)
    gemm += 2 * text * 2 * y * kv + 2 * len(lengths) * a * n_mod * d
    attention = sum(4 * n * n * d + 4 * n * t * d for n, t in zip(lengths, caption_lengths))
    return {"gemm": gemm, "attention": attention}


# Backward / forward FLOP ratios: a GEMM's backward is two GEMMs; flash attention's backward recomputes the
# scores and runs five matmuls to the forward's two.
GEMM_BACKWARD, ATTENTION_BACKWARD = 2.0, 2.5


def step_flops(model: Model, run: Run) -> dict[str, float]:
    """Matmul FLOPs of one training step of one sequence-parallel group (one sample), all blocks."""
    block = block_forward_flops(model.config, [run.tokens], [run.caption_tokens])
    # block checkpointing runs every block's forward again in the backward, selective all but the attention;
    # the ring's backward recomputes each step's attention forward (flagdit.parallel.ring)
    forwards = 1 + (run.checkpointing != "none")
    attention_forwards = 1 + (run.checkpointing == "block") + (run.strategy == "ring")
    layers = model.config.n_layers
    return {
        "gemm": layers * block["gemm"] * (forwards + GEMM_BACKWARD),
        "attention": layers * block["attention"] * (attention_forwards + ATTENTION_BACKWARD),
    }


# ---- memory -----------------------------------------------------------------------------------------------


def saved_per_token(model: Model, run: Run) -> list[tuple[str, float]]:
    """What autograd keeps for one block's backward from its forward on, in bytes per local token (bf16
    activations, fp32 softmax statistics), as the model and flagdit.parallel compute it with the Triton kernels:
    everything without checkpointing, the block's input with ``"block"``, the attention's tensors, the block's
    input and wo's input with ``"selective"``. tests/test_parallel_plan.py measures a real block
    (flagdit.memory.SavedBytes) against it."""
    d, kv, f = model.dim, model.kv_dim, model.config.ffn_dim
    heads = model.config.n_heads
    if run.checkpointing == "block":
        return [("block input (residual stream)", d * BF16)]
    block_input = ("attention norm input (residual stream)", d * BF16)
    # wo's input: the exchange's result (Ulysses' all-to-all, the ring's sum with the text branch); in one
    # process it is the kernel's own output, listed with the kernel's.
    wo_input = [("attention output, input of wo", d * BF16)] if run.sp > 1 else []
    common = [
        block_input,
        ("normalized input of wq / wk / wv", d * BF16),
        ("q, k before the QK LayerNorm", (d + kv) * BF16),
        *wo_input,
        ("wo output and the expanded msa gate", 2 * d * BF16),
        ("FFN norm input (residual stream)", d * BF16),
        ("normalized input of w1 / w3", d * BF16),
        ("w1, silu(w1), w3 outputs and their product (input of w2)", 4 * f * BF16),
        ("w2 output and the expanded mlp gate", 2 * d * BF16),
    ]
    if run.strategy == "ulysses":
        # After the all-to-all each rank holds all T tokens of H/P heads: T * (H/P) * Dh = (T/P) * H * Dh.
        attention = [
            ("kernel: q, k, v of the whole sequence for this rank's heads", (d + 2 * kv) * BF16),
            ("kernel: self output and text output", 2 * d * BF16),
            ("kernel: self and text LSE (fp32)", 2 * heads * FP32),
        ]
    else:
        # The ring's autograd function keeps this rank's q, k, v, the merged output and its LSE; the text branch
        # is one kernel call with zero values (flagdit.parallel.ring), which keeps its own outputs and LSEs.
        attention = [
            ("ring: q, k, v (this rank's rows)", (d + 2 * kv) * BF16),
            ("ring: merged self output and its LSE (fp32)", d * BF16 + heads * FP32),
            ("ring text call: zero values, output and text output", (kv + 2 * d) * BF16),
            ("ring text call: self and text LSE (fp32)", 2 * heads * FP32),
        ]
    if run.checkpointing == "selective":
        return [block_input, *wo_input, *attention]  # what the recomputed parts start from, and the attention
    return common + attention


def memory(model: Model, run: Run, hw: Hardware = Hardware()) -> dict[str, float]:
    """Bytes per GPU at the peak of the backward, by part, and their ``total``."""
    c, n = model.config, run.local_tokens
    block = sum(b for _, b in saved_per_token(model, replace(run, checkpointing="none")))
    kept = sum(b for _, b in saved_per_token(model, run))
    states = 16 * model.params / run.gpus  # fp32 master weights, fp32 gradients, AdamW m and v: FSDP2 shards
    fsdp = 2 * BF16 * model.block_params + FP32 * model.block_params  # gathered: this block + the prefetched one
    workspace = n * (4 * c.dim + 2 * c.ffn_dim) * BF16  # gradients alive inside one block's backward
    if run.strategy == "ring":  # the ring's backward: fp32 dq, dk/dv in flight and arriving, two k/v blocks,
        kv = model.kv_dim  # and one step's recomputed output (bf16 and fp32)
        workspace += n * (c.dim * FP32 + 4 * kv * FP32 + 4 * kv * BF16 + c.dim * (BF16 + FP32))
    # what every block keeps, and the rest of one block while the backward recomputes it
    activations = c.n_layers * n * kept + n * (block - kept)
    parts = {"states": states, "fsdp": fsdp, "activations": activations, "workspace": workspace}
    parts["total"] = sum(parts.values())
    parts["fits"] = parts["total"] <= hw.hbm_gib * GIB
    return parts


def one_block(model: Model, tokens: int, checkpointing: str) -> dict[str, float]:
    """One block's training step on one device, one sample of ``tokens`` tokens, bf16, no FSDP (what
    ``python -m flagdit.parallel.measure`` measures on a GPU): ``saved``, what autograd keeps after the forward
    (:func:`saved_per_token`), and ``peak``, the most allocated above the weights and the block's
    input during forward and backward (the block's activations, recomputed or not, its backward workspace and
    the weights' bf16 gradients; checkpointing changes ``saved``, not one block's peak). Per-token terms only:
    the caption's keys/values (a few MB at 7B with 256 caption tokens) are left out."""
    c, run = model.config, Run(1, 1, "ulysses", checkpointing, tokens)
    inventory = tokens * sum(b for _, b in saved_per_token(model, replace(run, checkpointing="none")))
    residual = tokens * c.dim * BF16
    workspace = tokens * (4 * c.dim + 2 * c.ffn_dim) * BF16
    return {
        "saved": tokens * sum(b for _, b in saved_per_token(model, run)),
        "peak": inventory - residual + workspace + model.block_params * BF16,
    }


# ---- communication and time -------------------------------------------------------------------------------


def _link_seconds(nbytes: float, ranks: int, hw: Hardware) -> float:
    """A collective moving ``nbytes`` out of each GPU evenly to ``ranks - 1`` peers: the on-node share over
    NVLink and the off-node share over the network run at the same time."""
    if ranks <= hw.gpus_per_node:
        return nbytes / (hw.nvlink_gbs * 1e9)
    on_node = (hw.gpus_per_node - 1) / (ranks - 1)
    return max(on_node * nbytes / (hw.nvlink_gbs * 1e9), (1 - on_node) * nbytes / (hw.network_gbs * 1e9))


def block_traffic(model: Model, run: Run, hw: Hardware = Hardware()) -> dict[str, float]:
    """Bytes each GPU sends per block forward (the backward sends as much again; the ring's three times as much)
    and their link seconds."""
    c, n, sp = model.config, run.local_tokens, run.sp
    if run.strategy == "ulysses":
        # q, k, v to the heads' ranks, the output back; kv heads copied to each rank that reads them when Hkv < P
        kv_sent = model.kv_dim if c.kv_heads >= sp else sp * c.head_dim
        sp_bytes = (sp - 1) / sp * n * (2 * model.dim + 2 * kv_sent) * BF16
        sp_seconds = _link_seconds(sp_bytes, sp, hw)
    else:
        step = n * 2 * model.kv_dim * BF16  # this rank's key/value block, to the next rank, sp - 1 times
        sp_bytes = (sp - 1) * step
        one_hop = hw.network_gbs if sp > hw.gpus_per_node else hw.nvlink_gbs  # a ring over nodes waits on a NIC
        sp_seconds = sp_bytes / (one_hop * 1e9)
    gather = (run.gpus - 1) / run.gpus * model.block_params * BF16  # FSDP2 all-gather of the block's bf16 weights
    reduce = (run.gpus - 1) / run.gpus * model.block_params * FP32  # and reduce-scatter of its fp32 gradients
    return {
        "sp_bytes": sp_bytes,
        "sp_seconds": sp_seconds,
        "gather_seconds": _link_seconds(gather, run.gpus, hw),
        "reduce_seconds": _link_seconds(reduce, run.gpus, hw),
    }


def step_time(model: Model, run: Run, hw: Hardware = Hardware()) -> dict[str, float]:
    """Seconds per training step per GPU: matmul compute at the measured rates, plus the communication no
    compute hides (see OVERLAP)."""
    seconds = lambda f: (f["gemm"] / (hw.matmul_tflops * 1e12) + f["attention"] / (hw.attention_tflops * 1e12)) / run.sp
    compute = seconds(step_flops(model, run))
    block_forward = seconds(block_forward_flops(model.config, [run.tokens], [run.caption_tokens]))
    layers = model.config.n_layers
    traffic = block_traffic(model, run, hw)
    forwards = 1 + (run.checkpointing == "block")  # selective does not recompute the attention's exchanges
    if run.strategy == "ulysses":  # on the critical path: attention needs the whole sequence, wo the output
        exposed_sp = layers * (forwards + 1) * traffic["sp_seconds"]
    else:  # every hop is posted before a step's kernels: only what exceeds the step's compute shows
        attention_step, hop = block_forward / run.sp, traffic["sp_seconds"] / (run.sp - 1)
        forward = max(0.0, hop - attention_step) * (run.sp - 1)
        # backward: k/v (bf16) and dk/dv (fp32) travel, P hops, against a recomputed forward and a backward
        backward = max(0.0, 3 * hop - (1 + ATTENTION_BACKWARD) * attention_step) * run.sp
        exposed_sp = layers * (forwards * forward + backward)
    # FSDP2 prefetches the next block's weights during this block's compute, and reduce-scatters a block's
    # gradients during the next block's backward: only what exceeds a block's compute shows.
    exposed_fsdp = layers * (
        2 * max(0.0, traffic["gather_seconds"] - block_forward)
        + max(0.0, traffic["reduce_seconds"] - GEMM_BACKWARD * block_forward)
    )
    total = compute + exposed_sp + exposed_fsdp
    return {
        "compute": compute,
        "block_forward": block_forward,
        "exposed_sp": exposed_sp,
        "exposed_fsdp": exposed_fsdp,
        "total": total,
        "tokens_per_gpu_second": run.tokens / (total * run.sp),
    }


def largest_context(model: Model, run: Run, hw: Hardware = Hardware(), quantum: int = 1024) -> int:
    """The longest sample (a multiple of ``quantum`` tokens) whose step fits in HBM; memory grows linearly with
    the tokens (flash attention keeps no score matrix), so this solves the line and rounds down."""
    at = lambda tokens: memory(model, replace(run, tokens=tokens), hw)["total"]
    slope = (at(2 * quantum * run.sp) - at(quantum * run.sp)) / (quantum * run.sp)
    tokens = (hw.hbm_gib * GIB - (at(quantum * run.sp) - slope * quantum * run.sp)) / slope
    return max(0, int(tokens // quantum) * quantum)
