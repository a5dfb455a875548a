"""The benchmark case type and the registry of benchmark families.

A family is a module that defines ``cases(quick: bool, device) -> list[Case]``, named by its module name,
found in the packages of ``FAMILY_PACKAGES``: ``flagdit_kernels.bench`` (one module per op family) and
``flagdit.bench`` (whole-model cases, which need the model and diffusers and so live above the kernels).
Adding a family is adding a module; nothing lists them by hand.

An op family also declares, beside its cases, ``smoke_cases(device) -> list[SmokeCase]``: one tiny call of each
of its ops (more where the kernels branch), which the GPU check's first phase (``tests/test_smoke.py``) runs on
every backend against the float64 reference; ``PLAN``: where the GPU check times its cases (``plan.py``); and
``PREDICTIONS``: ``{(op, shape, direction): text}``, what it expects of a case before any GPU run, which the
case carries into the run's log and ``flagdit-bench report --record`` into ``benchmarks/RESULTS.md``'s per-op
record when a run first measures it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import ModuleType

import torch

# Looked up when the benchmarks run (the kernel package imports no model): a package that is not installed
# contributes no family.
OP_FAMILIES = ("flagdit_kernels.bench.families",)  # the op families (smoke cases, predictions)
FAMILY_PACKAGES = (*OP_FAMILIES, "flagdit.bench")


@dataclass
class Case:
    """One timed workload. ``impls`` maps an implementation label ("triton", "reference", "torch.compile",
    "F.rms_norm", ...) to a builder that sets up inputs and returns the zero-argument callable to time.

    ``bytes`` is the minimum DRAM traffic and ``flops`` the useful floating-point work of one call; either
    may be 0 when meaningless. ``direction`` is "fwd" or "fwd+bwd". ``prediction``: what we expect of it, written
    before any GPU run (from its family's ``PREDICTIONS``).
    """

    op: str
    shape: str
    direction: str
    impls: dict[str, Callable[[], Callable[[], object]]]
    bytes: int = 0
    flops: int = 0
    notes: dict = field(default_factory=dict)
    prediction: str = ""

    @property
    def name(self) -> str:
        return f"{self.op}[{self.shape}]-{self.direction}"


@dataclass(frozen=True)
class SmokeCase:
    """One tiny call of a public op: ``shapes`` names its random input tensors (differentiated, checked forward
    and backward), ``run(backend, **tensors)`` calls the op on them with the fixed arguments it built for the
    device (offsets, tables). ``name`` is the case's test id."""

    name: str
    op: str
    shapes: dict[str, tuple[int, ...]]
    run: Callable[..., object]


@dataclass(frozen=True)
class Select:
    """Cases by their op, shape, direction and implementation label, each a shell-style wildcard (``fnmatch``,
    case-sensitive; ``a|b`` matches either): the unit of the GPU check's measurement plan (``bench/plan.py``)."""

    op: str
    shape: str = "*"
    direction: str = "*"
    impl: str = "*"

    def matches(self, op: str, shape: str, direction: str, impl: str) -> bool:
        fields = ((op, self.op), (shape, self.shape), (direction, self.direction), (impl, self.impl))
        return all(any(fnmatchcase(value, p) for p in pattern.split("|")) for value, pattern in fields)


# Implementation labels: our backends; ours and the baselines that cost no compile (torch.compile's cost one).
OURS = "triton|cuda"
CHEAP = f"{OURS}|F.rms_norm|liger*|lumina eager|python loop"


def offsets(lengths: list[int], device) -> torch.Tensor:
    """The int32 offsets ``[0, l0, l0 + l1, ...]`` of a packed batch of sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


@functools.cache
def _families(packages: tuple[str, ...] = FAMILY_PACKAGES) -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for package_name in packages:
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
    """The cases of one family (``family`` from :func:`family_names`), with their declared predictions."""
    module = _families()[family]
    out = module.cases(quick, device)
    predictions = getattr(module, "PREDICTIONS", {})
    for case in out:
        case.prediction = case.prediction or predictions.get((case.op, case.shape, case.direction), "")
    return out


def declared_predictions() -> dict[tuple[str, str, str], str]:
    """Every op family's ``PREDICTIONS``, by (op, shape, direction)."""
    return {key: text for m in _families(OP_FAMILIES).values() for key, text in getattr(m, "PREDICTIONS", {}).items()}


def all_cases(quick: bool, device: torch.device, families: tuple[str, ...] | None = None) -> list[Case]:
    """The cases of ``families`` (default: all of them)."""
    out: list[Case] = []
    for family in family_names() if families is None else families:
        out.extend(family_cases(family, quick, device))
    return out


def all_smoke_cases(device: torch.device) -> list[SmokeCase]:
    """The smoke cases of every op family (``flagdit_kernels.bench.families``; the whole-model families have
    none), the attention's last: they compile and autotune longest, so the cheap cases report first."""
    out: list[SmokeCase] = []
    for module in _families(OP_FAMILIES).values():
        declare = getattr(module, "smoke_cases", None)
        out.extend(declare(device) if callable(declare) else ())
    return sorted(out, key=lambda case: case.op == "varlen_attention")


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
