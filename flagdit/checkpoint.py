"""flagdit-train's checkpoints: written atomically with a checksum, read safely and verified (Lumina-T2X /
Lumina-Next weights load in :mod:`flagdit.lumina`, on the safe reading here).

Nothing here unpickles code: ``.pth``/``.pt``/``.bin`` files are read with ``torch.load(weights_only=True)`` and
``.safetensors`` files with safetensors (:func:`read_file`). Every way a file can be unusable (empty, truncated,
corrupt, holding pickled objects, another program's format) is one :class:`CheckpointError` that names the file
and what is wrong; :mod:`flagdit.lumina` raises it too (missing or duplicate shards, keys that are not a DiT's,
two files holding the same tensors).

flagdit-train checkpoints (:func:`save_training_checkpoint`): a dict (model, optimizer, step, config, args) with
``format``, ``version`` and ``sha256``, a digest of everything else (names, dtypes, shapes and bytes of every
tensor, and every plain value), which :func:`load_training_checkpoint` verifies, so a flipped byte anywhere in
the tensor data is an error, not a silently different model. The file is written to a temporary file beside
the target, fsynced, renamed over it and the directory fsynced (:func:`atomic_write`): a reader sees the old
checkpoint or the new one, complete, even after a crash or a power loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from .configs import FlagDiTConfig
from .model import FlagDiT

TRAIN_FORMAT = "flagdit-train"
TRAIN_FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file or directory that cannot be loaded as the checkpoint asked for; the message says why."""


# ----------------------------------------------------------------------------------------------------------
# Writing: atomic and durable.


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Calls ``write(file)`` on a temporary file beside ``path``, fsyncs it, renames it over ``path`` and fsyncs
    the directory: a reader sees the old file or the new one, complete, even after a crash or power loss."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def content_sha256(obj: object) -> str:
    """SHA-256 of a checkpoint's content: nested dicts, lists and tuples of tensors (dtype, shape and bytes) and
    plain values (None, bool, int, float, str), in order. Equal after a ``torch.save`` / ``torch.load`` round
    trip, different after any change to a value, a tensor byte, a name or the structure."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj: object) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest.update(f"tensor {t.dtype!s} {tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)};".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            _feed(digest, value)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        digest.update(f"{type(obj).__name__} {obj!r};".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors, containers and plain values, not {type(obj).__name__}")


def save_training_checkpoint(path: str | Path, payload: dict) -> None:
    """Writes a flagdit-train checkpoint (``payload``: model, optimizer, step, config, args) atomically, tagged
    with its format and the SHA-256 of its content."""
    body = {**payload, "format": TRAIN_FORMAT, "version": TRAIN_FORMAT_VERSION}
    body["sha256"] = content_sha256(body)
    atomic_write(Path(path), lambda f: torch.save(body, f))


# ----------------------------------------------------------------------------------------------------------
# Reading: one clear error per way a file can be unusable.

_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", re.S)


def read_file(path: Path) -> object:
    """The object stored in one file (safely), or a CheckpointError saying why it cannot be read."""
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted write or copy?")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # bad bytes fail in many ways (zip, unpickler, struct, storage sizes): all mean unreadable
        raise _unreadable(path, e) from e


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    text = str(error)
    found = _UNPICKLER_DETAIL.search(text)
    detail = found.group(1).strip().splitlines()[0] if found else (text.strip().splitlines() or [""])[0]
    return CheckpointError(
        f"{path} cannot be read as a tensor checkpoint with torch.load(weights_only=True) "
        f"({type(error).__name__}: {detail or 'no data'}): truncated or corrupt, or it pickles objects other "
        "than tensors and plain containers, which are never unpickled here"
    )


def load_training_checkpoint(path: str | Path) -> dict:
    """A flagdit-train checkpoint, read safely and verified against its checksum.

    A checkpoint written before checksums existed loads with a warning; anything that is not a flagdit-train
    checkpoint (Lumina weights, a bare state_dict) is a :class:`CheckpointError` saying what it looks like.
    """
    path = Path(path)
    ckpt = read_file(path)
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a flagdit-train checkpoint: {_describe(ckpt)}")
    if ckpt.get("format", TRAIN_FORMAT) != TRAIN_FORMAT or ckpt.get("version", 1) > TRAIN_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is format {ckpt.get('format')!r} version {ckpt.get('version')!r}; this flagdit reads "
            f"{TRAIN_FORMAT!r} up to version {TRAIN_FORMAT_VERSION}"
        )
    stored = ckpt.pop("sha256", None)
    if stored is None:
        warnings.warn(
            f"{path} carries no checksum (written by an older flagdit-train): loaded unverified", stacklevel=2
        )
    elif stored != content_sha256(ckpt):
        raise CheckpointError(
            f"{path} fails its checksum: its content changed after it was written (a corrupt disk, copy or "
            "transfer); restore it from a good copy"
        )
    return ckpt


def _describe(obj: object) -> str:
    """What a loaded object that is not a flagdit-train checkpoint looks like, and what reads it."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)
        hint = "Lumina-T2X / Lumina-Next weights load with flagdit.load_lumina"
        return f"it is a bare state_dict of {len(keys)} tensors ({', '.join(keys[:3])}, ...); {hint}"
    if isinstance(obj, dict):
        return f"it has no 'config' and 'model' entries (keys: {', '.join(map(str, list(obj)[:6])) or 'none'})"
    return f"it holds a {type(obj).__name__}, not a dict"


def _config_of(ckpt: dict, where: str) -> FlagDiTConfig:
    config = ckpt["config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}its config is a {type(config).__name__}, not a dict of FlagDiTConfig fields")
    try:
        return FlagDiTConfig(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}the checkpoint's config is not one this flagdit builds: {e}") from e


def _where(path: str | Path | None) -> str:
    return f"{path}: " if path is not None else ""


def training_state(ckpt: dict, path: str | Path | None = None) -> tuple[FlagDiTConfig, int]:
    """The config and step of a loaded flagdit-train checkpoint, or a :class:`CheckpointError` saying what does
    not fit (a checkpoint can pass its checksum and still hold another program's idea of these)."""
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{_where(path)}not a flagdit-train checkpoint: {_describe(ckpt)}")
    config = _config_of(ckpt, _where(path))
    step = ckpt.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{_where(path)}its step must be an int >= 0, got {step!r}")
    for name in ("optimizer", "args"):
        if name in ckpt and not isinstance(ckpt[name], dict):
            raise CheckpointError(f"{_where(path)}its {name} is a {type(ckpt[name]).__name__}, not a dict")
    if "optimizer" not in ckpt:
        raise CheckpointError(f"{_where(path)}it has no optimizer state to resume from")
    return config, step


def check_weights_fit(model: torch.nn.Module, state: object, path: str | Path | None = None) -> None:
    """A :class:`CheckpointError` unless ``state`` has exactly ``model``'s parameter names and shapes."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{_where(path)}its model is a {type(state).__name__}, not a state_dict")
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    wrong = [
        f"{k} {tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__} "
        f"(the config's model has {tuple(want[k].shape)})"
        for k in want
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != want[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = [f"{name} {items[:3]}{' ...' if len(items) > 3 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
                 if items]  # fmt: skip
        raise CheckpointError(f"{_where(path)}the checkpoint's weights do not fit its config: {'; '.join(parts)}")


def model_from_state(ckpt: dict, backend: str | None = None, path: str | Path | None = None) -> FlagDiT:
    """The model of a loaded flagdit-train checkpoint (see :func:`load_training_checkpoint`)."""
    if not isinstance(ckpt, dict) or not {"config", "model"} <= ckpt.keys():
        raise CheckpointError(f"{_where(path)}not a flagdit-train checkpoint: {_describe(ckpt)}")
    model = FlagDiT(_config_of(ckpt, _where(path)), backend=backend)
    check_weights_fit(model, ckpt["model"], path)
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def model_from_checkpoint(path: str | Path, backend: str | None = None) -> FlagDiT:
    """The model stored in a flagdit-train checkpoint file."""
    return model_from_state(load_training_checkpoint(path), backend, path)
