"""Input checks shared by the public ops: each raises a ValueError/TypeError naming the argument.

Checks of Python values, shapes, dtypes and devices always run (they cost no device work). Checks that read
tensor values copy them to the host, so they run where that is free: CPU tensors in eager mode, or any device
with ``FLAGDIT_KERNELS_VALIDATE=1`` (or true/yes/on; see :func:`values_checked`); the kernels stay in bounds
without them.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from itertools import pairwise

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The largest offset an int32 ``cu_seqlens`` holds, so the longest sequence one can describe. Integers beyond it
# (``max_seqlen``) are refused here rather than reaching a custom op's int64 argument or a kernel's grid.
MAX_INT32 = 2**31 - 1

VALIDATE_VAR = "FLAGDIT_KERNELS_VALIDATE"
_VALIDATE_ON = ("1", "true", "yes", "on")
_VALIDATE_OFF = ("", "0", "false", "no", "off")
_warned_validate: set[str] = set()


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An int >= ``minimum`` (and <= ``maximum`` when given). A bool is not an int here: ``True`` standing for 1
    hides a mistake."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")
    return value


def check_number(name: str, value: object, *, positive: bool = False, maximum: float | None = None) -> float:
    """A finite real number >= 0 (> 0 with ``positive``; <= ``maximum`` when given), as a float.

    NaN passes every ``<`` comparison and inf makes tables of cos/sin or normalizers meaningless, so both are
    rejected; so are bools (``eps=True``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    low = "> 0" if positive else ">= 0"
    in_range = value > 0 if positive else value >= 0
    if maximum is not None:
        in_range = in_range and value <= maximum
        low = f"in {'(' if positive else '['}0, {maximum:g}]"
    if not math.isfinite(value) or not in_range:
        raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
    return float(value)


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_dtype(name: str, t: torch.Tensor, other: str, like: torch.Tensor) -> None:
    """``name`` must have the dtype of the input called ``other``, ``like``."""
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {other} has {like.dtype}; they must match")


def validate_requested() -> bool:
    """``FLAGDIT_KERNELS_VALIDATE`` read as a switch: ``1``/``true``/``yes``/``on`` (any case) turn the value
    checks on for every device; unset, empty, ``0``/``false``/``no``/``off`` leave them off; anything else
    leaves them off and warns once per value, naming the variable and the accepted spellings."""
    raw = os.environ.get(VALIDATE_VAR, "")
    value = raw.strip().lower()
    if value in _VALIDATE_ON:
        return True
    if value not in _VALIDATE_OFF and raw not in _warned_validate:
        _warned_validate.add(raw)
        warnings.warn(
            f"{VALIDATE_VAR}={raw!r} is not understood; use one of {'/'.join(_VALIDATE_ON)} to turn value checks "
            f"on or {'/'.join(v for v in _VALIDATE_OFF if v)} (or leave it unset) to keep them off; they stay off",
            stacklevel=3,
        )
    return False


def values_checked(device: torch.device) -> bool:
    """Whether checks that read tensor values on the host run for tensors on ``device`` (see check_cu_seqlens)."""
    if torch.compiler.is_compiling():
        return False
    requested = validate_requested()  # read on every device, so that a misspelt value warns wherever it is set
    return device.type == "cpu" or requested


def check_cu_seqlens(
    name: str,
    cu_seqlens: object,
    total: int,
    device: torch.device,
    *,
    total_name: str = "the token count",
    sync: bool | None = None,
) -> torch.Tensor:
    """Checks a flash-attn style offsets vector: int32, 1-D, >= 2 entries, 0 first, non-decreasing, last == total.

    The value checks copy the offsets to the host. ``sync=None`` (auto) runs them for CPU tensors in eager
    mode, and for GPU tensors only when ``FLAGDIT_KERNELS_VALIDATE=1`` (a debugging aid: a device sync per
    call); the GPU kernels stay memory-safe with bad offsets, their results are then meaningless.
    """
    if sync is None:
        sync = values_checked(device)
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    assert isinstance(cu_seqlens, torch.Tensor)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 offsets (batch + 1), got {cu_seqlens.numel()}")
    if sync:
        values = cu_seqlens.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        if any(b < a for a, b in pairwise(values)):
            raise ValueError(f"{name} must be non-decreasing, got {values}")
        if values[-1] != total:
            raise ValueError(f"{name}[-1] must equal {total_name} ({total}), got {values[-1]}")
    return cu_seqlens


def check_max_seqlen(name: str, max_seqlen: object, cu_seqlens: torch.Tensor, *, sync: bool) -> int:
    """A non-negative int no larger than an int32 offset can describe (:data:`MAX_INT32`); with ``sync`` (see
    :func:`values_checked`) also at least the longest sequence, since kernels launch ``cdiv(max_seqlen, BLOCK)``
    blocks per sequence and a smaller value would drop tokens."""
    check_int(name, max_seqlen, 0, MAX_INT32)
    if sync and cu_seqlens.numel() > 1:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if max_seqlen < longest:
            raise ValueError(f"{name} ({max_seqlen}) is smaller than the longest sequence ({longest})")
    return max_seqlen


def check_per_sample(
    name: str,
    t: object,
    x: torch.Tensor,
    num_seqs: int | None,
) -> torch.Tensor:
    """Checks a per-sample modulation tensor against x's layout and returns it ready to broadcast.

    Layouts: packed ``x (T, D)`` of ``num_seqs`` sequences takes ``(num_seqs, D)``; padded ``x (B, L, D)``
    (``num_seqs`` None) takes ``(B, D)``; otherwise the tensor must broadcast to ``x`` as it is.
    """
    check_tensor(name, t, device=x.device)
    assert isinstance(t, torch.Tensor)
    d = x.shape[-1]
    if num_seqs is not None:
        check_shape(name, t, (num_seqs, d))
    elif x.dim() == 3 and t.dim() == 2:
        check_shape(name, t, (x.shape[0], d))
    else:
        try:
            broadcast = torch.broadcast_shapes(t.shape, x.shape)
        except RuntimeError:
            broadcast = None
        # The output has x's shape: a tensor that would broadcast x to something bigger (scale (3, T, D) with
        # x (T, D)) is an error on every backend, not a bigger result on one and an exception on another.
        if broadcast != x.shape:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} does not broadcast to x of shape {tuple(x.shape)}; "
                "use (B, D) with padded (B, L, D) x, or (B, D) with packed (T, D) x and cu_seqlens"
            )
        if t.shape[-1] != d:
            raise ValueError(f"{name} must end in the feature size {d}, got shape {tuple(t.shape)}")
    return t
