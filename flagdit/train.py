"""``flagdit-train``: flow-matching training of a Flag-DiT on the procedural shapes data set.

Single process: ``flagdit-train --out runs/tiny --steps 1000``. Distributed (CPU with gloo or GPUs with NCCL):
``torchrun --nproc_per_node 2 -m flagdit.train --dist ddp`` or ``--dist fsdp`` (FSDP2 ``fully_shard`` per block).
The global batch of step s is items ``s*B .. s*B+B-1`` of the data set, and each item's time, noise and caption
dropout are seeded by (seed, step, item); rank r trains items ``r, r+W, ...``. The loss is the per-item velocity
MSE averaged over the global batch, so any number of processes follows the same trajectory.
Checkpoints (``OUT/ckpt.pt``: model, optimizer, step, config) are full state_dicts readable with
``torch.load(weights_only=True)``; ``--resume`` continues from one.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .configs import FlagDiTConfig, get_config
from .data import WordEncoder, make_item
from .flow import null_caption, sample_t, training_loss
from .model import FlagDiT


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flagdit-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="named config (default: tiny)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", default="runs/tiny", help="output directory (checkpoint, log.jsonl)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (items)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--t-dist", default="logit-normal", choices=("uniform", "logit-normal"))
    p.add_argument("--cap-dropout", type=float, default=0.1, help="probability of training on the null caption")
    p.add_argument("--video-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="flagdit_kernels backend for every op (default: fastest)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights), for GPUs")
    p.add_argument("--dist", default="auto", choices=("auto", "none", "ddp", "fsdp"))
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt when it exists")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: leave as is)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_config(name: str, sets: list[str]) -> FlagDiTConfig:
    overrides = {}
    for item in sets:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return get_config(name, **overrides)


def item_seed(seed: int, step: int, index: int) -> int:
    return (seed * 7_919 + step) * 100_003 + index


def global_batch(args, step: int, encoder: WordEncoder, items: list[int]):
    """Pixels, captions and the seeded t / noise / caption dropout of the chosen items of step's global batch."""
    xs, captions, ts, noise, drop = [], [], [], [], []
    for i in items:
        item = make_item(args.seed, step * args.batch_size + i, args.video_fraction)
        g = torch.Generator().manual_seed(item_seed(args.seed, step, i))
        xs.append(item.pixels)
        captions.append(item.caption)
        ts.append(sample_t(1, args.t_dist, generator=g))
        noise.append(torch.randn(item.pixels.shape, generator=g))
        drop.append(float(torch.rand(1, generator=g)) < args.cap_dropout)
    feats, mask = encoder(captions)
    null_feats, null_mask = null_caption(feats, mask)
    keep = torch.tensor([not d for d in drop]).view(-1, 1)
    feats = torch.where(keep.unsqueeze(-1), feats, null_feats)
    mask = torch.where(keep, mask, null_mask)
    return xs, torch.cat(ts), noise, feats, mask


def _setup_distributed(mode: str):
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
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return mode, rank, world, device


def _wrap(model: FlagDiT, mode: str, device: torch.device):
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # pad_token (kept for Lumina checkpoints) and [nextframe] in image-only batches get no gradient.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)  # fmt: skip
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_state_dicts(model, optimizer, model_sd, optim_sd) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_sd, options=StateDictOptions(full_state_dict=True))
    # Parameters that never received a gradient (pad_token; [nextframe] before the first video) have no
    # AdamW state yet, so the optimizer part is loaded non-strictly.
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True, strict=False))


def save_checkpoint(path: Path, model, optimizer, step: int, config: FlagDiTConfig, args, rank: int) -> None:
    model_sd, optim_sd = _state_dicts(model, optimizer)
    if rank != 0:
        return
    payload = {
        "model": model_sd,
        "optimizer": optim_sd,
        "step": step,
        "config": config.to_dict(),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, read safely (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(path: str | Path, backend: str | None = None) -> FlagDiT:
    ckpt = load_checkpoint(path)
    model = FlagDiT(FlagDiTConfig(**ckpt["config"]), backend=backend)
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def train(args: argparse.Namespace) -> list[float]:
    """Runs the training loop; returns the global-batch loss of every step run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    mode, rank, world, device = _setup_distributed(args.dist)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    resume = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    config = FlagDiTConfig(**resume["config"]) if resume else build_config(args.config, args.set)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = FlagDiT(config, backend=args.backend).to(device)
    model = _wrap(model, mode, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = 0
    if resume:
        _load_state_dicts(model, optimizer, resume["model"], resume["optimizer"])
        start = resume["step"]
    encoder = WordEncoder(config.cap_feat_dim)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters()) if mode != "fsdp" else config.num_params()
        print(f"flagdit-train: {args.config} ({n_params / 1e6:.2f}M params), {mode} x{world}, "
              f"steps {start}..{args.steps}, global batch {args.batch_size}", flush=True)  # fmt: skip
    log = open(out / "log.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True)
    mine = list(range(rank, args.batch_size, world))
    losses, smooth, t_start, tokens = [], None, time.time(), 0
    for step in range(start, args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr
        xs, t, noise, feats, mask = global_batch(args, step, encoder, mine)
        xs = [x.to(device) for x in xs]
        noise = [n.to(device) for n in noise]
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        with autocast:
            per_item = training_loss(model, xs, feats.to(device), mask.to(device), t=t.to(device), x0=noise,
                                     reduction="none")  # fmt: skip
        per_item.mean().backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = per_item.detach().sum()
        if world > 1:
            dist.all_reduce(total)
        loss = total.item() / args.batch_size
        losses.append(loss)
        tokens += sum(x.numel() // x.shape[0] // config.patch_size**2 for x in xs) * world
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.1e}")
        if log is not None and ((step + 1) % args.log_every == 0 or step == start):
            rate = tokens / max(time.time() - t_start, 1e-9)
            log.write(json.dumps({"step": step + 1, "loss": loss, "loss_ema": smooth, "lr": lr,
                                  "patch_tokens_per_s": rate}) + "\n")  # fmt: skip
            log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(ckpt_path, model, optimizer, step + 1, config, args, rank)
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
        if losses:
            k = max(1, min(20, len(losses) // 4))
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            print(f"loss: first {k} steps {first:.4f} -> last {k} steps {last:.4f}; checkpoint {ckpt_path}")
    if math.isnan(losses[-1] if losses else 0.0):
        raise FloatingPointError("the loss became NaN")
    return losses


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        train(args)
        if dist.is_initialized():
            # Every rank leaves its last collective (FSDP's checkpoint gather) before any tears gloo down: a
            # rank destroying the group while another is still inside one aborts that rank.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
