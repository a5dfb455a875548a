"""Loads the compiled extension ``flagdit_kernels._C`` and remembers why it is missing when it is."""

from __future__ import annotations

import importlib
from types import ModuleType

_C: ModuleType | None = None
_C_ERROR: str | None = None

try:
    _C = importlib.import_module("flagdit_kernels._C")
except ImportError as exc:  # a pure-Python install, or a build for another torch
    _C_ERROR = f"{type(exc).__name__}: {exc}"


def extension() -> ModuleType | None:
    """The compiled module, or None when it could not be imported."""
    return _C


def extension_error() -> str | None:
    """Why the compiled module is missing (None when it loaded)."""
    return _C_ERROR


def extension_has_cuda() -> bool:
    return _C is not None and bool(_C.build_info()["cuda"])


def extension_missing(cuda: bool = False) -> str:
    """Why the compiled ops (the CUDA ones with ``cuda``) cannot run: "" when they can. For ``_dispatch.register``."""
    if _C is None:
        return f"no compiled extension ({_C_ERROR})"
    if cuda and not extension_has_cuda():
        return "the compiled extension was built without CUDA"
    return ""
