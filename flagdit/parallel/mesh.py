"""The 2D ``DeviceMesh`` (sequence parallel x data-parallel shard) and the sequence-parallel group it holds.

``init_mesh(sp)`` lays the world out with the sp ranks adjacent (ranks ``d*sp .. d*sp+sp-1`` are one group), so
a group of up to 8 sits on one node's NVLink and its all-to-alls never cross the network; the data-parallel
dimension strides across nodes. Its dims are ordered ``("sp", "dp")`` because that is the mesh FSDP2's
``fully_shard`` takes for parameters whole within a group and sharded over ``dp`` (dim 0 replicates, dim 1
shards; a DeviceMesh cannot be sliced into a reordered view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

DP, SP = "dp", "sp"


def init_mesh(sp: int, device_type: str | None = None) -> DeviceMesh:
    """The world as an ``(sp, world // sp)`` mesh named ``("sp", "dp")``, sp groups of adjacent ranks;
    ``device_type`` defaults to cuda when the process group is NCCL, else cpu."""
    if not dist.is_initialized():
        raise RuntimeError("init_mesh needs torch.distributed initialized (run under torchrun)")
    world = dist.get_world_size()
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise ValueError(f"sp must be a positive int, got {sp!r}")
    if world % sp:
        raise ValueError(f"sp ({sp}) must divide the world size ({world}): each data-parallel rank owns one group")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    ranks = torch.arange(world).view(world // sp, sp).T  # ranks[s, d] = d * sp + s
    return DeviceMesh(device_type, ranks, mesh_dim_names=(SP, DP))


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh ``fully_shard(mesh=...)`` takes with an :func:`init_mesh` layout: parameters sharded over
    ``dp``, replicated over ``sp`` (FSDP2's hybrid layout). Gradients are averaged over both, which the
    sequence-parallel model's gather accounts for (see ``flagdit.parallel.apply``)."""
    if not isinstance(mesh, DeviceMesh) or mesh.mesh_dim_names != (SP, DP):
        dims = getattr(mesh, "mesh_dim_names", None)
        raise ValueError(f"mesh must be a DeviceMesh with dims ('{SP}', '{DP}') (init_mesh), got dims {dims}")
    return mesh


@dataclass(frozen=True)
class SPGroup:
    """A validated sequence-parallel group: the process group, this rank's place in it, and its device type
    (None for a bare ProcessGroup, which does not say)."""

    group: ProcessGroup
    rank: int
    size: int
    device_type: str | None = None


def sp_group(group: ProcessGroup | DeviceMesh | SPGroup) -> SPGroup:
    """The sequence-parallel group of ``group``: a ProcessGroup, a 1D DeviceMesh, or a mesh with an ``"sp"``
    dimension (its ``"sp"`` sub-mesh). Raises ``ValueError`` (the same on every rank, before any collective) for
    a group of one rank, which has nothing to parallelize over."""
    if isinstance(group, SPGroup):
        return group
    device_type = None
    if isinstance(group, DeviceMesh):
        names = group.mesh_dim_names or ()
        if group.ndim > 1:
            if SP not in names:
                raise ValueError(f"group: a {group.ndim}D DeviceMesh needs an '{SP}' dimension, got dims {names}")
            group = group[SP]
        device_type = group.device_type
        group = group.get_group()
    if not isinstance(group, ProcessGroup):
        raise TypeError(f"group must be a ProcessGroup or DeviceMesh, got {type(group).__name__}")
    size = dist.get_world_size(group)
    if size < 2:
        raise ValueError(
            "group: sequence parallelism needs a group of at least 2 ranks, this one has 1 (run the model unchanged)"
        )
    return SPGroup(group, dist.get_rank(group), size, device_type)
