"""flagdit-train's processes: the process group torchrun starts (or one process alone), the (dp, sp) mesh of
--sp, DDP or FSDP2 around the model, full state dicts gathered for a checkpoint and loaded back, and a finiteness
check every rank agrees on."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..model import FlagDiT

DEFAULT_DIST_TIMEOUT_S = 900


def setup_distributed(mode: str, timeout_s: float = DEFAULT_DIST_TIMEOUT_S):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if world == 1 and mode != "none" and not dist.is_initialized():
        # Single process with --dist ddp/fsdp still wraps the model (useful to check the wrapping alone).
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if mode != "none" and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return mode, rank, world, device


def sequence_parallel_mesh(sp: int, mode: str, device: torch.device):
    """The (dp, sp) mesh of --sp > 1 (None for 1)."""
    if sp == 1:
        return None
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"--sp {sp} needs --dist ddp or fsdp under torchrun, got --dist {mode}")
    from ..parallel import init_mesh

    return init_mesh(sp, device.type)


def wrap(model: FlagDiT, mode: str, device: torch.device, bf16: bool = False):
    """DDP or FSDP2 around the model. With ``bf16``, FSDP2 gathers bf16 copies of the fp32 parameters for
    compute and reduce-scatters fp32 gradients (the optimizer keeps fp32 master weights); the model casts its
    inputs to its weights' dtype, so the residual stream is bf16 (inputs are not cast by FSDP2: the RoPE table
    in the layout stays fp32). DDP keeps fp32 parameters, gradients and their all-reduce, and bf16 comes from
    autocast (matmuls in bf16, the residual stream fp32)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # pad_token (kept for Lumina checkpoints) and [nextframe] in image-only batches get no gradient.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)  # fmt: skip
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()  # fp32 throughout
        if bf16:
            policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
        for layer in model.layers:  # sharded over the whole world, sequence-parallel ranks too
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def full_state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model, optimizer, model_sd, optim_sd) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    # Parameters that never received a gradient (pad_token; [nextframe] before the first video) have no
    # AdamW state yet, so the optimizer part is loaded non-strictly.
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))


def finite_everywhere(model, world: int) -> bool:
    """Whether every rank's parameters (its shards under FSDP) are finite: one all-reduce of a flag, so every
    rank decides the same."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # FSDP2: this rank's shard
    ok = torch.tensor([all(bool(torch.isfinite(p).all()) for p in local)], dtype=torch.int32)
    if world > 1:
        device = next(model.parameters()).device
        ok = ok.to(device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
