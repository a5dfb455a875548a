"""The benchmark case type and the registry of benchmark families.

A family is a module that defines ``cases(quick: bool, device) -> list[Case]``, named by its module name,
found in the packages of ``FAMILY_PACKAGES``: ``flagdit_kernels.bench`` (one module per op family) and
``flagdit.bench`` (whole-model cases, which need the model and diffusers and so live above the kernels).
Adding a family is adding a module; nothing lists them by hand.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

# Looked up when the benchmarks run (the kernel package imports no model): a package that is not installed
# contributes no family.
FAMILY_PACKAGES = ("flagdit_kernels.bench.families", "flagdit.bench")


@dataclass
class Case:
    """One timed workload. ``impls`` maps an implementation label ("triton", "reference", "torch.compile",
    "F.rms_norm", ...) to a builder that sets up inputs and returns the zero-argument callable to time.

    ``bytes`` is the minimum DRAM traffic and ``flops`` the useful floating-point work of one call; either
    may be 0 when meaningless. ``direction`` is "fwd" or "fwd+bwd".
    """

    op: str
    shape: str
    direction: str
    impls: dict[str, Callable[[], Callable[[], object]]]
    bytes: int = 0
    flops: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape}]-{self.direction}"


@functools.cache
def _families() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for package_name in FAMILY_PACKAGES:
        if importlib.util.find_spec(package_name.split(".")[0]) is None:
            continue
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{package_name}.{info.name}")
            if not callable(getattr(module, "cases", None)):
                continue
            if info.name in found:
                raise RuntimeError(f"benchmark family {info.name!r} is defined by {found[info.name].__name__} and "
                                   f"{module.__name__}")  # fmt: skip
            found[info.name] = module
    return found


def family_names() -> tuple[str, ...]:
    """Every benchmark family's name, in discovery order."""
    return tuple(_families())


def family_cases(family: str, quick: bool, device: torch.device) -> list[Case]:
    """The cases of one family (``family`` from :func:`family_names`)."""
    return _families()[family].cases(quick, device)


def all_cases(quick: bool, device: torch.device, families: tuple[str, ...] | None = None) -> list[Case]:
    """The cases of ``families`` (default: all of them)."""
    out: list[Case] = []
    for family in family_names() if families is None else families:
        out.extend(family_cases(family, quick, device))
    return out


def backend_impls(op: str, device: torch.device, make: Callable[[str], Callable[[], object]]) -> dict:
    """Builders for every backend of ``op`` that runs on ``device`` (interpreted Triton excluded: it
    measures the interpreter, not the kernel)."""
    from .. import available_backends

    names = [b for b in available_backends(op, device) if not (b == "triton" and device.type == "cpu")]
    return {name: (lambda name=name: make(name)) for name in names}


def forward_backward(fn: Callable[[], torch.Tensor | tuple], grad_inputs: list[torch.Tensor]) -> Callable[[], None]:
    """Wraps a forward closure into forward + backward with a fixed random upstream gradient."""
    probe = fn()
    outs = [probe] if isinstance(probe, torch.Tensor) else [o for o in probe if isinstance(o, torch.Tensor)]
    upstream = [torch.randn_like(o) for o in outs]

    def step() -> None:
        for t in grad_inputs:
            t.grad = None
        res = fn()
        res = [res] if isinstance(res, torch.Tensor) else [o for o in res if isinstance(o, torch.Tensor)]
        torch.autograd.backward(res, upstream)

    return step
