"""The PyTorch definition of every op: the spec the kernels are tested against and the fallback anywhere.

These functions assume validated inputs; the public wrappers in ``flagdit_kernels`` check them first. The package
exports what each op family's module lists in its ``__all__`` (a new op is exported by its own module).
"""

from . import attention, embed, norms, packing, rope
from .attention import *  # noqa: F403
from .embed import *  # noqa: F403
from .norms import *  # noqa: F403
from .packing import *  # noqa: F403
from .rope import *  # noqa: F403

__all__ = sorted(name for family in (attention, embed, norms, packing, rope) for name in family.__all__)
