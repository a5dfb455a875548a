"""Backend registry and per-call backend choice.

Every public op has up to four implementations: ``reference`` (PyTorch, any device), ``triton`` (GPU, or
the CPU under ``TRITON_INTERPRET=1``), ``cuda`` and ``cpu`` (the compiled extension). Each op module
registers what it has with :func:`register`; :func:`resolve` picks one for a call:

1. ``backend=`` given to the call: that backend, or a ``ValueError`` when it cannot run here;
2. else ``FLAGDIT_KERNELS_BACKEND``: that backend when it can run the op here, else the default;
3. else the default: the first available backend in the op's preference order for the tensors' device.

Interpreted Triton is never a default (it is a correctness tool, orders of magnitude slower than eager).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# "flash_attn" is third-party (flash-attn's varlen kernel under varlen_attention): available, never a default.
BACKENDS = ("reference", "triton", "cuda", "cpu", "flash_attn")
ENV_VAR = "FLAGDIT_KERNELS_BACKEND"

# Fastest first. Ops may override per device once measurements say otherwise.
_DEFAULT_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


@dataclass
class _Impl:
    fn: Callable
    devices: tuple[str, ...]
    available: Callable[[], bool]
    why_not: Callable[[], str]


@dataclass
class _Op:
    name: str
    impls: dict[str, _Impl] = field(default_factory=dict)
    order: dict[str, tuple[str, ...]] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    devices: tuple[str, ...],
    available: Callable[[], bool] = lambda: True,
    why_not: Callable[[], str] = lambda: "not available",
) -> None:
    """Registers ``fn`` as ``op``'s ``backend`` implementation for tensors on ``devices``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    entry = _OPS.setdefault(op, _Op(op))
    entry.impls[backend] = _Impl(fn, devices, available, why_not)


def set_preference(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Overrides the default order for one op on one device type (decided by measurement)."""
    _OPS.setdefault(op, _Op(op)).order[device_type] = order


def _runs_here(impl: _Impl, backend: str, device_type: str) -> bool:
    if not impl.available():
        return False
    if device_type in impl.devices:
        return True
    return backend == "triton" and device_type == "cpu" and triton_interpreted()


def available_backends(op: str, device: torch.device | str | None = None) -> list[str]:
    """Backends that can run ``op`` for tensors on ``device`` (default: CUDA if present, else CPU)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = _device_type(device)
    return [b for b in BACKENDS if b in _OPS[op].impls and _runs_here(_OPS[op].impls[b], b, device_type)]


def ops() -> list[str]:
    return sorted(_OPS)


def resolve(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """Returns ``(backend_name, fn)`` for one call of ``op`` on tensors living on ``device``."""
    entry = _OPS[op]
    device_type = _device_type(device)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        impl = entry.impls.get(backend)
        if impl is None:
            raise ValueError(f"{op}: no {backend!r} implementation (has {sorted(entry.impls)})")
        if not _runs_here(impl, backend, device_type):
            reason = impl.why_not() if not impl.available() else f"it does not run on {device_type} tensors"
            raise ValueError(f"{op}: backend {backend!r} cannot run here: {reason}")
        return backend, impl.fn
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {forced!r}")
        impl = entry.impls.get(forced)
        if impl is not None and _runs_here(impl, forced, device_type):
            return forced, impl.fn
    order = entry.order.get(device_type, _DEFAULT_ORDER.get(device_type, ("reference",)))
    for name in order:
        impl = entry.impls.get(name)
        if impl is not None and impl.available() and device_type in impl.devices:
            return name, impl.fn
    return "reference", entry.impls["reference"].fn
