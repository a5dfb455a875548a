"""The benchmark case type and the registry of op families."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Modules under flagdit_kernels.bench that define ``cases(quick: bool, device) -> list[Case]``.
FAMILIES = ("norms", "rope", "attention", "packing", "diffusers_lumina", "model")


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


def all_cases(quick: bool, device: torch.device, families: tuple[str, ...] = FAMILIES) -> list[Case]:
    out: list[Case] = []
    for family in families:
        module = importlib.import_module(f"flagdit_kernels.bench.{family}")
        out.extend(module.cases(quick, device))
    return out


def backend_impls(op: str, device: torch.device, make: Callable[[str], Callable[[], object]]) -> dict:
    """Builders for every backend of ``op`` that runs on ``device`` (interpreted Triton excluded: it
    measures the interpreter, not the kernel)."""
    from .. import _dispatch

    names = [b for b in _dispatch.available_backends(op, device) if not (b == "triton" and device.type == "cpu")]
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
