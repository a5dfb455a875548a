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
import datetime
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
    atomic_write,
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
DEFAULT_DIST_TIMEOUT_S = 900


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (in use, or holding a run that would be lost)."""


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


def conditioning(config: FlagDiTConfig, modality: list[str], cameras: list, device) -> dict:
    """The modality / camera keyword arguments this config's model takes."""
    kwargs = {}
    if config.n_modalities:
        kwargs["modality"] = modality
    if config.camera_cond and any(c is not None for c in cameras):
        kwargs["cameras"] = [None if c is None else c.to(device) for c in cameras]
    return kwargs


def _setup_distributed(mode: str, timeout_s: float = DEFAULT_DIST_TIMEOUT_S):
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


def _sequence_parallel_mesh(sp: int, mode: str, device: torch.device):
    """The (dp, sp) mesh of --sp > 1 (None for 1)."""
    if sp == 1:
        return None
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"--sp {sp} needs --dist ddp or fsdp under torchrun, got --dist {mode}")
    from ..parallel import init_mesh

    return init_mesh(sp, device.type)


def _wrap(model: FlagDiT, mode: str, device: torch.device, bf16: bool = False):
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


class DivergedError(FloatingPointError):
    """The loss or the weights stopped being finite; nothing of that state was saved."""


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


def save_checkpoint(path: Path, model, optimizer, step: int, config: FlagDiTConfig, args, rank: int) -> None:
    model_sd, optim_sd = _state_dicts(model, optimizer)
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


def lock_run_dir(out: Path):
    """An exclusive lock on OUT/.lock, held until the returned file is closed (or the process ends)."""
    import fcntl

    f = open(out / ".lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(
            f"{out} is in use by another flagdit-train (pid {holder} holds {out / '.lock'}); "
            "wait for it to finish or choose another --out"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def truncate_log(path: Path, step: int) -> None:
    """Keeps the records of log.jsonl up to ``step`` (the checkpoint a run starts from): a run killed after its
    last checkpoint logged steps that the resumed run trains again. A torn last line is dropped too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write(path, lambda f: f.write("".join(kept).encode()))


def _check_checkpoint_path(ckpt_path: Path) -> None:
    """Anything at OUT/ckpt.pt that is not a regular file (or a link to one) is an error, never a fresh start:
    a dangling link or a loop would otherwise read as "no checkpoint" and be replaced by a run from step 0."""
    if not os.path.lexists(ckpt_path):
        return
    if ckpt_path.is_symlink():
        try:
            target = ckpt_path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing target, or a loop (RuntimeError before Python 3.13)
            raise RunDirError(
                f"{ckpt_path} is a symbolic link to {os.readlink(ckpt_path)!r}, which does not resolve (missing, "
                "or a loop); point it at a checkpoint or remove it"
            ) from None
        if not target.is_file():
            raise RunDirError(f"{ckpt_path} links to {target}, which is not a checkpoint file")
    elif not ckpt_path.is_file():
        kind = "a directory" if ckpt_path.is_dir() else "not a regular file"
        raise RunDirError(f"{ckpt_path} is {kind}, not a checkpoint; move it away or choose another --out")
    if not os.access(ckpt_path, os.R_OK):
        raise RunDirError(f"{ckpt_path} is not readable (permissions)")


def _claim_run_dir(args, out: Path, ckpt_path: Path, rank: int, world: int):
    """Rank 0 locks OUT and checks that starting here loses no run; every rank raises the same error if not."""
    lock, error = None, None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = lock_run_dir(out)
            _check_checkpoint_path(ckpt_path)
            if ckpt_path.exists() and not (args.resume or args.overwrite):
                lock.close()
                lock = None
                raise RunDirError(
                    f"{ckpt_path} exists: pass --resume to continue that run or --overwrite to start over"
                )
        except (RunDirError, OSError) as e:
            if lock is not None:
                lock.close()
                lock = None
            error = f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e)
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise RunDirError(error)
    return lock


def train(args: argparse.Namespace) -> list[float]:
    """Runs the training loop; returns the global-batch loss of every step run."""
    if args.threads:
        torch.set_num_threads(args.threads)
    mode, rank, world, device = _setup_distributed(args.dist, args.dist_timeout)
    mesh = _sequence_parallel_mesh(args.sp, mode, device)
    data_ranks = world // args.sp
    if args.batch_size % data_ranks:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {data_ranks} data-parallel ranks")
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    lock = _claim_run_dir(args, out, ckpt_path, rank, world)
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
    model = _wrap(model, mode, device, args.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    saved = start if resume else None  # the step of the checkpoint on disk that this run must never lose
    if resume:
        try:
            _load_state_dicts(model, optimizer, resume["model"], resume["optimizer"])
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
        cond = conditioning(config, batch["modality"], batch["cameras"], device)
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
