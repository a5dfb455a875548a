"""flagdit-train's run directory OUT: one run at a time holds OUT/.lock; a directory with a checkpoint is
continued only with --resume and restarted only with --overwrite; anything at OUT/ckpt.pt that is not a
checkpoint file is an error, never a fresh start; OUT/log.jsonl is cut back to the step a run starts from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from ..checkpoint import atomic_write


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (in use, or holding a run that would be lost)."""


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


def check_checkpoint_path(ckpt_path: Path) -> None:
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


def claim_run_dir(out: Path, ckpt_path: Path, resume: bool, overwrite: bool, rank: int, world: int):
    """Rank 0 locks OUT and checks that starting here loses no run (``resume`` / ``overwrite``: --resume and
    --overwrite); every rank raises the same error if not. Returns the lock (None on other ranks)."""
    lock, error = None, None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = lock_run_dir(out)
            check_checkpoint_path(ckpt_path)
            if ckpt_path.exists() and not (resume or overwrite):
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
