"""``fk.backend_info()``: what this install can run, and why a backend is missing."""

from __future__ import annotations

import importlib.metadata

import torch

from . import _dispatch
from ._extension import extension, extension_error, extension_has_cuda


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_status(cuda: bool) -> str:
    """Whether the Triton kernels can run here, and if not, why and how to get them."""
    if not _dispatch.TRITON_INSTALLED:
        return "unavailable: triton is not installed (pip install triton, or the [triton] extra)"
    if cuda:
        return "available on CUDA tensors"
    if _dispatch.triton_interpreted():
        return (
            "interpreted on the CPU (TRITON_INTERPRET=1): runs when named (backend='triton'), for correctness "
            "checks, orders of magnitude slower than a GPU"
        )
    return (
        "unavailable: there is no CUDA device; on the CPU the Triton kernels run only under Triton's "
        "interpreter (set TRITON_INTERPRET=1 before importing flagdit_kernels, then pass backend='triton')"
    )


def backend_info() -> dict:
    """A summary of backends: the extension's build, Triton, CUDA, each op's available backends, and the engine
    each attention regime chose by measurement (ops/attention_engines.py)."""
    from .ops import attention_engines

    ext = extension()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "triton_status": triton_status(cuda),
        "triton_interpreter": _dispatch.triton_interpreted(),
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "extension": "loaded" if ext is not None else f"missing: {extension_error()}",
        "extension_cuda": extension_has_cuda(),
        "default_device": device,
        "forced_backend": _dispatch.forced_backend(),
        "ops": {op: _dispatch.available_backends(op, device) for op in _dispatch.ops()},
        "attention_engines": attention_engines.chosen(),  # the engine each attention regime chose (measured)
    }
