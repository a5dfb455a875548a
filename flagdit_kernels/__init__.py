"""flagdit-kernels: fused kernels for Flow-based Large Diffusion Transformers (Flag-DiT, Lumina-T2X).

Every op runs on the fastest backend available for its inputs; ``backend=`` per call, ``prefer=`` (a module's
or model's backend) and the ``FLAGDIT_KERNELS_BACKEND`` environment variable override, in that order.
``fk.backend_info()`` says what is available. This module is the package's public API: the model
(``flagdit``), the integrations and the benchmarks use nothing else.

``fk.integrations`` (patching other codebases' modules) is imported on first use.
"""

from . import nn, ops
from ._dispatch import BACKENDS, available_backends
from ._info import backend_info
from ._layout import VarlenLayout
from .ops import *  # noqa: F403

__version__ = "0.1.0"

__all__ = ["BACKENDS", "VarlenLayout", "available_backends", "backend_info", "integrations", "nn"]  # noqa: F405 (integrations: __getattr__)
__all__ += ops.__all__  # every op family's public names (each ops/<family>.py lists its own)


def __getattr__(name: str):
    # The integrations sit above the ops (they patch other codebases onto them): imported when first asked for.
    if name == "integrations":
        import importlib

        return importlib.import_module(".integrations", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
