"""Public ops: input validation, backend choice and autograd wiring, one module per op family.

Each family's module lists its public names in ``__all__``; ``flagdit_kernels`` exports them all, so a new op of
a family is exported by its own module (importing it is what registers its backends).
"""

from . import attention, coarse_attention, embed, norms, packing, rope, tile_sparsity
from .attention import *  # noqa: F403
from .coarse_attention import *  # noqa: F403
from .embed import *  # noqa: F403
from .norms import *  # noqa: F403
from .packing import *  # noqa: F403
from .rope import *  # noqa: F403
from .tile_sparsity import *  # noqa: F403

__all__ = sorted(
    name
    for family in (attention, coarse_attention, embed, norms, packing, rope, tile_sparsity)
    for name in family.__all__
)
