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


def backend_info() -> dict:
    """A summary of backends: the extension's build, Triton, CUDA, and each op's available backends."""
    ext = extension()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "triton_interpreter": _dispatch.triton_interpreted(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": "loaded" if ext is not None else f"missing: {extension_error()}",
        "extension_cuda": extension_has_cuda(),
        "default_device": device,
        "forced_backend": _dispatch.forced_backend(),
        "ops": {op: _dispatch.available_backends(op, device) for op in _dispatch.ops()},
    }
