"""Long context across GPUs: sequence parallelism (Ulysses and ring) over the packed tokens of a Flag-DiT.

Applied to a model, not written into it::

    mesh = flagdit.parallel.init_mesh(sp=8)              # ("dp", "sp") DeviceMesh over the world
    flagdit.parallel.parallelize(model, mesh)            # every forward spreads its tokens over mesh["sp"]
    for layer in model.layers:                           # FSDP2 as usual: sharded over every rank
        fully_shard(layer)
    fully_shard(model)

    with flagdit.parallel.sequence_parallel(model, group):   # or for one block of code (sampling)
        ...

Files: ``mesh.py`` (the 2D mesh, the group), ``sharding.py`` (which tokens a rank holds, the local layout),
``collectives.py`` (the differentiable exchanges), ``ulysses.py`` and ``ring.py`` (the two attentions),
``apply.py`` (the model's forward over a shard), ``plan.py`` (the memory and time plan's arithmetic;
its document is written by ``flagdit.cli.long_context_plan``).
"""

from .apply import (
    STRATEGIES,
    SequenceParallel,
    parallelize,
    sequence_parallel,
    sequence_parallel_attention,
    unparallelize,
)
from .mesh import DP, SP, SPGroup, init_mesh, sp_group
from .sharding import ShardedLayout, TokenShard, shard_tokens

__all__ = [
    "DP",
    "SP",
    "STRATEGIES",
    "SPGroup",
    "SequenceParallel",
    "ShardedLayout",
    "TokenShard",
    "init_mesh",
    "parallelize",
    "sequence_parallel",
    "sequence_parallel_attention",
    "shard_tokens",
    "sp_group",
    "unparallelize",
]
