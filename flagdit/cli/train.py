"""flagdit-train: flow-matching training of a Flag-DiT on a procedural data set of any modality.

Single process: flagdit-train --modality mixed --out runs/mixed --steps 400. Distributed (CPU with gloo or GPUs
with NCCL): torchrun --nproc_per_node 2 -m flagdit.cli.train --dist ddp (or --dist fsdp, FSDP2 fully_shard per block).
Long context: --sp N spreads each item's tokens over groups of N ranks (flagdit.parallel: a 2D mesh of data
parallel x sequence parallel; the N ranks of a group train the same items, FSDP2 shards over all ranks).

The global batch of step s is items s*B .. s*B+B-1 of the data set, and each item's time, noise and caption
dropout are seeded by (seed, step, item); rank r trains items r, r+W, .... The loss is the per-item velocity
MSE averaged over the global batch, so any number of processes follows the same trajectory. Checkpoints
(OUT/ckpt.pt: model, optimizer, step, config, arguments) are full state_dicts readable with
torch.load(weights_only=True), written atomically (temporary file, fsync, rename) with a SHA-256 of their content
that loading verifies (flagdit/checkpoint.py). One run at a time holds
OUT/.lock; a directory with a checkpoint is continued only with --resume and restarted only with --overwrite;
OUT/log.jsonl is cut back to the checkpoint's step when a run starts, so it never repeats steps. A run whose loss
or weights stop being finite stops at that step without saving (the checkpoint keeps the last finite state).
Every mistake in the arguments or the environment is one line on stderr, found before anything is written;
--debug shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import flagdit_kernels as fk

from ..checkpoint import (
    CheckpointError,
    check_weights_fit,
    load_training_checkpoint,
    save_training_checkpoint,
    training_state,
)
from ..configs import FlagDiTConfig, get_config, names
from ..data import DATASETS, DEFAULT_VIEWS, WordEncoder, audio, make_item, multiview, shapes
from ..flow import T_DISTS, null_caption, sample_t, training_loss
from ..memory import SavedBytes
from ..modality import MODALITIES
from ..model import CHECKPOINTING, FlagDiT
from . import args as ca
from .distributed import (
    DEFAULT_DIST_TIMEOUT_S,
    finite_everywhere,
    full_state_dicts,
    load_full_state_dicts,
    sequence_parallel_mesh,
    setup_distributed,
    wrap,
)
from .run_dir import RunDirError, claim_run_dir, truncate_log

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(FlagDiTConfig))
# flagdit-train builds every model able to take every modality (the config can still turn it off with --set).
ANY_MODALITY = {"n_modalities": len(MODALITIES), "camera_cond": True}
# Every latent side of the data sets (image and view sizes, mel bins, spectrogram frames) is a multiple of this,
# so the patch size must divide it.
DATA_SIZE_MULTIPLE = math.gcd(
    *(side for size in shapes.IMAGE_SIZES for side in size), *shapes.VIDEO_SIZE[1:], *multiview.VIEW_SIZE,
    audio.N_MELS, *audio.FRAME_CHOICES,
)  # fmt: skip
VISUAL_CHANNELS = 3  # the image, video and multi-view data are RGB


def _config_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or key not in CONFIG_FIELDS:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY one of {', '.join(CONFIG_FIELDS)}, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = ca.ArgumentParser(prog="flagdit-train", description="\n\n".join(doc[:2]), formatter_class=ca.HelpFormatter)
    p.add_argument("--modality", default="image", choices=DATASETS,
                   help="data set: image (shapes, with --video-fraction short clips), video, multiview, audio, or "
                        "mixed (every batch holds all four in one packed sequence)")  # fmt: skip
    p.add_argument("--views", type=ca.bounded_int(1, multiview.MAX_VIEWS), default=DEFAULT_VIEWS,
                   help="cameras per multi-view item")  # fmt: skip
    p.add_argument("--config", default="tiny", choices=names(), help="named model config")
    p.add_argument("--set", action="append", default=[], type=_config_override, metavar="KEY=VALUE",
                   help="override a config field, repeatable (default: none; flagdit-train sets "
                        "n_modalities=4 and camera_cond=True)")  # fmt: skip
    p.add_argument("--out", default="runs/tiny", help="output directory (ckpt.pt, log.jsonl)")
    p.add_argument("--steps", type=ca.positive_int, default=1000, help="train until this global step")
    p.add_argument("--batch-size", type=ca.positive_int, default=16, help="global batch, in items")
    p.add_argument("--lr", type=ca.positive_float, default=1e-3, help="AdamW peak learning rate")
    p.add_argument("--warmup", type=ca.non_negative_int, default=50, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=ca.non_negative_float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--t-dist", default="logit-normal", choices=T_DISTS, help="distribution of the flow time t")
    p.add_argument("--cap-dropout", type=ca.probability, default=0.1,
                   help="probability of training an item on the null caption (for guidance)")  # fmt: skip
    p.add_argument("--video-fraction", type=ca.probability, default=0.15,
                   help="share of short clips in --modality image")  # fmt: skip
    p.add_argument("--seed", type=ca.seed, default=0, help="seed of the data, the noise and the initial weights")
    p.add_argument("--backend", default=None, choices=fk.BACKENDS,
                   help="flagdit_kernels backend for every op that has it (default: the fastest per op)")  # fmt: skip
    p.add_argument("--bf16", action="store_true",
                   help="bf16 compute with fp32 master weights, for GPUs: autocast, and under --dist fsdp bf16 "
                        "parameters in compute (a bf16 residual stream) with fp32 gradient reduction")  # fmt: skip
    p.add_argument("--dist", default="auto", choices=("auto", "none", "ddp", "fsdp"),
                   help="data parallelism; auto is ddp under torchrun with several processes, else none")  # fmt: skip
    p.add_argument(
        "--sp",
        type=ca.positive_int,
        default=1,
        help="sequence-parallel group size: every item's tokens spread over N ranks (default 1: off)",
    )
    p.add_argument(
        "--sp-strategy",
        default="auto",
        choices=("auto", "ulysses", "ring"),
        help="sequence-parallel attention; auto is Ulysses where the heads split over --sp, else ring",
    )
    p.add_argument("--activation-checkpointing", default="none", choices=CHECKPOINTING,
                   help="what each block keeps for the backward: everything (none), its input (block: the block runs "
                        "again in the backward), or the attention's inputs, output and LSE (selective)")  # fmt: skip
    ca.add_attention_options(p)
    p.add_argument("--save-every", type=ca.positive_int, default=200, help="checkpoint every this many steps")
    p.add_argument("--log-every", type=ca.positive_int, default=10, help="append to log.jsonl every this many steps")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt (a fresh start if none)")
    again.add_argument("--overwrite", action="store_true", help="start at step 0 even if OUT/ckpt.pt exists")
    p.add_argument("--threads", type=ca.non_negative_int, default=0,
                   help="torch CPU threads per process (default: 0, leave torch's choice)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dist-timeout", type=ca.positive_float, default=DEFAULT_DIST_TIMEOUT_S, metavar="SECONDS",
                   help="how long a rank waits in a collective for the others before the run fails (raise it if "
                        "saving a checkpoint takes longer)")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, checked against each other, the model config and the environment (backends, librosa,
    the torchrun world): every mistake is an argparse error here, before anything exists on disk."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        config = build_config(args.config, args.set)
    except (ValueError, TypeError) as e:
        p.error(f"--config/--set: {e}")
    problem = _data_problem(config, args.modality) or _environment_problem(args) or _world_problem(args, config)
    if problem:
        p.error(problem)
    return args


def _data_problem(config: FlagDiTConfig, modality: str) -> str | None:
    if DATA_SIZE_MULTIPLE % config.patch_size:
        return (
            f"--set patch_size={config.patch_size}: the data sets' sizes are multiples of {DATA_SIZE_MULTIPLE}, "
            f"so the patch size must divide {DATA_SIZE_MULTIPLE}"
        )
    if modality != "audio" and config.in_channels < VISUAL_CHANNELS:
        return f"--set in_channels={config.in_channels}: {modality} data has {VISUAL_CHANNELS} channels"
    return None


def _environment_problem(args) -> str | None:
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    problem = ca.backend_problem(args.backend, device_type)
    if problem:
        return problem
    if args.modality in ("audio", "mixed") and importlib.util.find_spec("librosa") is None:
        return f"--modality {args.modality} needs librosa for its audio: pip install 'flagdit-kernels[audio]'"
    return None


def _world_problem(args, config: FlagDiTConfig) -> str | None:
    """What the process count torchrun gives (WORLD_SIZE, the same on every rank) cannot do with these
    arguments: each rank reports the same line and no rank waits for another."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.sp > 1:
        if args.attention_window is not None or args.attention_top_k is not None:
            return f"--sp {args.sp}: tile-sparse attention (--attention-window / --attention-top-k) runs on one rank"
        if config.coarse_attention:
            return f"--sp {args.sp}: the coarse attention branch (--set coarse_attention=True) runs on one rank"
        if world % args.sp or world == 1:
            return (
                f"--sp {args.sp} spreads each item over {args.sp} processes: run under torchrun with a multiple of "
                f"{args.sp} processes (this is {world})"
            )
        if args.dist == "none":
            return f"--sp {args.sp} needs --dist ddp or fsdp (or auto), got --dist none"
        if args.sp_strategy == "ulysses":
            from ..parallel.ulysses import check_heads

            try:
                check_heads(config.n_heads, config.kv_heads, args.sp)
            except ValueError as e:
                return f"--sp-strategy ulysses: {e} (--sp-strategy ring takes any head count)"
    data_ranks = world // args.sp
    if args.batch_size % data_ranks:
        return f"--batch-size {args.batch_size} must be divisible by the {data_ranks} data-parallel ranks"
    return None


def build_config(name: str, sets: list[tuple[str, object]]) -> FlagDiTConfig:
    """The named config with flagdit-train's any-modality fields, then the --set overrides, applied."""
    return get_config(name, **{**ANY_MODALITY, **dict(sets)})


def item_seed(seed: int, step: int, index: int) -> int:
    return (seed * 7_919 + step) * 100_003 + index


def global_batch(args, step: int, encoder: WordEncoder, items: list[int]) -> dict:
    """Latents, captions, conditioning and the seeded t / noise / caption dropout of the chosen items of step's
    global batch."""
    xs, captions, ts, noise, drop, modality, cameras = [], [], [], [], [], [], []
    for i in items:
        item = make_item(args.seed, step * args.batch_size + i, args.video_fraction,
                         modality=args.modality, views=args.views)  # fmt: skip
        g = torch.Generator().manual_seed(item_seed(args.seed, step, i))
        xs.append(item.latent)
        captions.append(item.caption)
        modality.append(item.modality)
        cameras.append(item.cameras)
        ts.append(sample_t(1, args.t_dist, generator=g))
        noise.append(torch.randn(item.latent.shape, generator=g))
        drop.append(float(torch.rand(1, generator=g)) < args.cap_dropout)
    feats, mask = encoder(captions)
    null_feats, null_mask = null_caption(feats, mask)
    keep = torch.tensor([not d for d in drop]).view(-1, 1)
    feats = torch.where(keep.unsqueeze(-1), feats, null_feats)
    mask = torch.where(keep, mask, null_mask)
    return dict(x1=xs, t=torch.cat(ts), x0=noise, feats=feats, mask=mask, modality=modality, cameras=cameras)


class DivergedError(FloatingPointError):
    """The loss or the weights stopped being finite; nothing of that state was saved."""


def save_checkpoint(path: Path, model, optimizer, step: int, config: FlagDiTConfig, args, rank: int) -> None:
    model_sd, optim_sd = full_state_dicts(model, optimizer)
    if rank != 0:
        return
    plain = (int, float, str, bool, type(None), tuple)  # what a weights_only load reads (tuples as lists)
    payload = {
        "model": model_sd,
        "optimizer": optim_sd,
        "step": step,
        "config": config.to_dict(),
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if isinstance(v, plain)},
    }
    save_training_checkpoint(path, payload)


def train(args: argparse.Namespace) -> list[float]:
    """Runs the training loop; returns the global-batch loss of every step run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    mode, rank, world, device = setup_distributed(args.dist, args.dist_timeout)
    mesh = sequence_parallel_mesh(args.sp, mode, device)
    data_ranks = world // args.sp
    if args.batch_size % data_ranks:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {data_ranks} data-parallel ranks")
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    lock = claim_run_dir(out, ckpt_path, args.resume, args.overwrite, rank, world)
    try:
        return _train(args, mode, rank, world, device, out, ckpt_path, mesh)
    finally:
        if lock is not None:
            lock.close()


def _train(args, mode: str, rank: int, world: int, device, out: Path, ckpt_path: Path, mesh=None) -> list[float]:
    resume = load_training_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    config, start = training_state(resume, ckpt_path) if resume else (build_config(args.config, args.set), 0)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    sparsity, tile = ca.attention_settings(args)  # a run's own choice, never the checkpoint's: dense -> sparse works
    model = FlagDiT(config, backend=args.backend, checkpointing=args.activation_checkpointing,
                    attention_sparsity=sparsity, attention_tile=tile).to(device)  # fmt: skip
    attention = ca.describe_attention(model)
    if resume:  # before any wrapping, the same error on every rank
        check_weights_fit(model, resume["model"], ckpt_path)
    data_rank, data_ranks, data_group, sp = rank, world, None, ""
    if mesh is not None:
        from ..parallel import parallelize

        model = parallelize(model, mesh, args.sp_strategy)
        data_rank, data_ranks, data_group = mesh["dp"].get_local_rank(), mesh["dp"].size(), mesh["dp"].get_group()
        sp = f" (sequence-parallel groups of {args.sp}, {model.sequence_parallel.strategy})"
    conditioning_inputs = model.conditioning_inputs  # the FlagDiT's own, before DDP wraps it
    model = wrap(model, mode, device, args.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    saved = start if resume else None  # the step of the checkpoint on disk that this run must never lose
    if resume:
        try:
            load_full_state_dicts(model, optimizer, resume["model"], resume["optimizer"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{ckpt_path}: the checkpoint's optimizer state does not fit the model: {e}") from e
    encoder = WordEncoder(config.cap_feat_dim)
    log = None
    if rank == 0:
        truncate_log(out / "log.jsonl", start)
        n_params = sum(p.numel() for p in model.parameters()) if mode != "fsdp" else config.num_params()
        print(f"flagdit-train: {args.config} ({n_params / 1e6:.2f}M params), {args.modality} data, {mode} x{world}"
              f"{sp}, steps {start}..{args.steps}, global batch {args.batch_size}, attention {attention}",
              flush=True)  # fmt: skip
        log = open(out / "log.jsonl", "a")  # noqa: SIM115
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True)
    mine = list(range(data_rank, args.batch_size, data_ranks))
    losses, smooth, t_start, tokens = [], None, time.time(), 0
    for step in range(start, args.steps):
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = global_batch(args, step, encoder, mine)
        xs = [x.to(device) for x in batch["x1"]]
        noise = [n.to(device) for n in batch["x0"]]
        cond = conditioning_inputs(batch["modality"], batch["cameras"], device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with autocast, SavedBytes(model) as saved_tensors:
            per_item = training_loss(model, xs, batch["feats"].to(device), batch["mask"].to(device),
                                     t=batch["t"].to(device), x0=noise, reduction="none", **cond)  # fmt: skip
        memory = {"saved_bytes": saved_tensors.bytes}  # this rank's, read before the backward frees them
        per_item.mean().backward()
        if device.type == "cuda":
            memory["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = per_item.detach().sum()
        if data_ranks > 1:
            dist.all_reduce(total, group=data_group)
        loss = total.item() / args.batch_size
        if not math.isfinite(loss):  # the same all-reduced value on every rank: all stop here together
            raise _stop(bar, log, DivergedError(_diverged(step + 1, f"the loss is {loss}", lr, ckpt_path, saved)))
        losses.append(loss)
        tokens += sum(x.numel() // x.shape[0] // config.patch_size**2 for x in xs) * data_ranks
        smooth = loss if smooth is None else 0.95 * smooth + 0.05 * loss
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss_ema=f"{smooth:.4f}", lr=f"{lr:.1e}")
        if log is not None and ((step + 1) % args.log_every == 0 or step == start):
            rate = tokens / max(time.time() - t_start, 1e-9)
            log.write(json.dumps({"step": step + 1, "loss": loss, "loss_ema": smooth, "lr": lr,
                                  "patch_tokens_per_s": rate, "attention": attention, **memory}) + "\n")  # fmt: skip
            log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            if not finite_everywhere(model, world):  # never replace a good checkpoint by non-finite weights
                what = "the weights are not finite"
                raise _stop(bar, log, DivergedError(_diverged(step + 1, what, lr, ckpt_path, saved)))
            if log is not None:
                os.fsync(log.fileno())  # the log holds every step the checkpoint does
            save_checkpoint(ckpt_path, model, optimizer, step + 1, config, args, rank)
            saved = step + 1
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
        if losses:
            k = max(1, min(20, len(losses) // 4))
            first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
            seconds = time.time() - t_start
            print(f"loss (raw global-batch mean): first {k} steps {first:.4f} -> last {k} steps {last:.4f}; "
                  f"{len(losses)} steps in {seconds:.0f} s ({seconds / len(losses):.2f} s/step); "
                  f"checkpoint {ckpt_path}")  # fmt: skip
        else:
            print(f"nothing to do: {ckpt_path} is at step {start} >= --steps {args.steps}")
    return losses


def _stop(bar, log, error: Exception) -> Exception:
    """``error``, after closing the progress bar (so the error starts a line of its own) and the log."""
    for handle in (bar, log):
        if handle is not None:
            handle.close()
    return error


def _diverged(step: int, what: str, lr: float, ckpt_path: Path, saved: int | None) -> str:
    kept = f"{ckpt_path} still holds step {saved}" if saved is not None else "no checkpoint was written"
    return f"training diverged at step {step}: {what} (learning rate {lr:.3g}); nothing was saved, {kept}"


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        ca.run_main("flagdit-train", lambda: train(args), args.debug, (RunDirError, DivergedError, NotImplementedError))
        if dist.is_initialized():
            # Every rank leaves its last collective (FSDP's checkpoint gather) before any tears gloo down: a
            # rank destroying the group while another is still inside one aborts that rank.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
