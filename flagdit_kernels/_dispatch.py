"""The backend registry: what every implementation of an op can run, and the one decision per call.

Every public op has up to five implementations: ``reference`` (PyTorch, any device), ``triton`` (GPU, or the
CPU under ``TRITON_INTERPRET=1``), ``cuda`` and ``cpu`` (the compiled extension) and, for ``varlen_attention``,
``flash_attn`` (third party). Each op module declares with :func:`register` what each implementation takes:
the device types it runs on, the dtypes (None: every dtype the op's validation lets through), and, where it
matters, a cheap predicate on the tensor that decides the call (head dims, layouts). :func:`resolve` picks one
implementation per call from the inputs and these preferences, highest first:

1. ``backend=`` given to the call: that backend, or a ``ValueError`` saying why it cannot run these inputs;
2. else ``prefer=``, a module's or model's backend (``fk.nn`` modules, ``flagdit.FlagDiT`` and the
   integrations pass their ``backend`` this way, and nothing else decides for them): an op that implements
   that backend uses it, exactly as in 1 (it raises when that implementation cannot run these inputs, so a
   missing kernel is never hidden); an op without such an implementation goes on to 3;
3. else ``FLAGDIT_KERNELS_BACKEND``: that backend when it can run these inputs, else 4;
4. the default: the first backend in the op's order for the device (:func:`set_preference`) that can run
   these inputs; ``reference`` runs everything.

Interpreted Triton runs CPU tensors when a backend is named (1 to 3), never as a default: it is a correctness
tool, orders of magnitude slower than eager. The environment (``FLAGDIT_KERNELS_BACKEND``,
``TRITON_INTERPRET``) is read once, at import; :func:`reload_environment` reads it again (tests that change
the variables call it). :func:`resolve` runs on every op call, so it reads no environment, imports nothing and
is plain Python that ``torch.compile(fullgraph=True)`` traces to a constant choice.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu", "flash_attn", "torch_varlen")
ENV_VAR = "FLAGDIT_KERNELS_BACKEND"

# Fastest first. Ops override this per device (set_preference) once measurements say otherwise.
_DEFAULT_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# The one answer to "is Triton usable": installed (looked up once), on CUDA tensors, or on CPU tensors under the
# interpreter when a backend is named. Every Triton implementation registers with ``**TRITON``.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON = {
    "devices": ("cuda",),
    "missing": lambda: "" if TRITON_INSTALLED else "triton is not installed",
}
# The dtypes a kernel that computes in fp32 takes: every Triton kernel that computes (rather than copies) and
# the CUDA C++ rms_norm. float64 inputs go to the backends that compute in float64 (reference, the C++ CPU
# rms_norm) by default; naming such a kernel's backend for them is a ValueError that says which dtypes it takes.
# Copy-only kernels (pack / unpack, the embedding's placeholder rows after a float64 GEMM) take any dtype.
FP32_MATH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class _Environment:
    forced: str | None  # FLAGDIT_KERNELS_BACKEND ("" or unset: None)
    triton_interpreted: bool  # TRITON_INTERPRET=1


def _read_environment() -> _Environment:
    return _Environment(os.environ.get(ENV_VAR) or None, os.environ.get("TRITON_INTERPRET") == "1")


_env = _read_environment()


def reload_environment() -> None:
    """Reads ``FLAGDIT_KERNELS_BACKEND`` and ``TRITON_INTERPRET`` again (they are otherwise read once, at import)."""
    global _env
    _env = _read_environment()


def forced_backend() -> str | None:
    """``FLAGDIT_KERNELS_BACKEND`` as read at import (or by :func:`reload_environment`)."""
    return _env.forced


def triton_interpreted() -> bool:
    """``TRITON_INTERPRET=1`` as read at import (Triton reads it when its kernels are defined)."""
    return _env.triton_interpreted


@dataclass(eq=False)
class Impl:
    """One implementation of one op and what it can run (see the module docstring)."""

    op: str
    backend: str
    fn: Callable
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None = None
    accepts: Callable[[torch.Tensor], str] | None = None  # inputs -> "" when it runs them, else why not
    missing: Callable[[], str] = lambda: ""  # "" when installed, else why not (it looks things up once)


@dataclass
class _Op:
    name: str
    impls: dict[str, Impl] = field(default_factory=dict)
    order: dict[str, tuple[str, ...]] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    devices: tuple[str, ...],
    dtypes: tuple[torch.dtype, ...] | None = None,
    accepts: Callable[[torch.Tensor], str] | None = None,
    missing: Callable[[], str] = lambda: "",
) -> None:
    """Registers ``fn`` as ``op``'s ``backend`` implementation.

    ``devices``: the device types it runs (and may be a default on); ``dtypes``: the dtypes of the deciding
    tensor it takes (None: any); ``accepts(tensor)``: "" when it runs that input, else the reason;
    ``missing()``: "" when the implementation is installed, else the reason. Both run per call: keep them
    cheap (``missing`` looks an optional dependency up once and remembers).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    entry = _OPS.setdefault(op, _Op(op))
    entry.impls[backend] = Impl(op, backend, fn, devices, dtypes, accepts, missing)


def set_preference(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Overrides the default order for one op on one device type (decided by measurement)."""
    _OPS.setdefault(op, _Op(op)).order[device_type] = order


@torch.compiler.assume_constant_result
def _missing(impl: Impl) -> str:
    """Why ``impl`` is not installed ("" when it is): a constant to torch.compile, which does not trace the probe."""
    return impl.missing()


def _runs_on(impl: Impl, device_type: str, named: bool) -> bool:
    if device_type in impl.devices:
        return True
    return named and impl.backend == "triton" and device_type == "cpu" and _env.triton_interpreted


def _why_not(impl: Impl, like: torch.Tensor, named: bool) -> str:
    """The empty string when ``impl`` can run a call decided by ``like``, else the reason."""
    reason = _missing(impl)
    if reason:
        return reason
    device_type = like.device.type
    if not _runs_on(impl, device_type, named):
        return f"it does not run on {device_type} tensors"
    if impl.dtypes is not None and like.dtype not in impl.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in impl.dtypes)
        return f"it takes {names}, not {str(like.dtype).removeprefix('torch.')}"
    return impl.accepts(like) if impl.accepts is not None else ""


def _check_name(what: str, name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS} or None, got {name!r}")


def _named(entry: _Op, name: str, like: torch.Tensor) -> Impl:
    impl = entry.impls.get(name)
    if impl is None:
        raise ValueError(f"{entry.name}: no {name!r} implementation (has {sorted(entry.impls)})")
    reason = _why_not(impl, like, named=True)
    if reason:
        raise ValueError(f"{entry.name}: backend {name!r} cannot run here: {reason}")
    return impl


def resolve(op: str, like: torch.Tensor, backend: str | None = None, prefer: str | None = None) -> Impl:
    """The implementation of ``op`` for one call whose device and dtype are ``like``'s (see the module docstring
    for the precedence of ``backend``, ``prefer``, the environment and the default order)."""
    entry = _OPS[op]
    if backend is not None:
        _check_name("backend", backend)
        return _named(entry, backend, like)
    if prefer is not None:
        _check_name("a module's backend", prefer)
        if prefer in entry.impls:
            return _named(entry, prefer, like)
    forced = _env.forced
    if forced is not None:
        _check_name(ENV_VAR, forced)
        impl = entry.impls.get(forced)
        if impl is not None and not _why_not(impl, like, named=True):
            return impl
    device_type = like.device.type
    for name in entry.order.get(device_type, _DEFAULT_ORDER.get(device_type, ())):
        impl = entry.impls.get(name)
        if impl is not None and not _why_not(impl, like, named=False):
            return impl
    return entry.impls["reference"]


def available_backends(op: str, device: torch.device | str | None = None) -> list[str]:
    """Backends that can run ``op`` for tensors on ``device`` (default: CUDA if present, else CPU)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    impls = _OPS[op].impls
    return [b for b in BACKENDS if b in impls and not _missing(impls[b]) and _runs_on(impls[b], device_type, True)]


def ops() -> list[str]:
    return sorted(_OPS)


def registered_backends(op: str) -> list[str]:
    """Every backend registered for ``op``, whether or not it can run here (what the op has, not what runs)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(_OPS)}")
    return [b for b in BACKENDS if b in _OPS[op].impls]
