"""The 2D ``DeviceMesh`` (data parallel x sequence parallel) and the sequence-parallel group it holds.

``init_mesh(sp)`` lays the world out as ``("dp", "sp")`` with the sp ranks adjacent (ranks ``d*sp ..
d*sp+sp-1`` are one group), so a group of up to 8 sits on one node's NVLink and its all-to-alls never cross
the network; the data-parallel dimension strides across nodes. The ranks of a group train the same items;
FSDP2 shards the parameters over every rank of the world (both dims: a group needs the whole model per block
anyway and all-gathers it block by block), so ``fully_shard`` takes its default mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DP, SP = "dp", "sp"


def init_mesh(sp: int, device_type: str | None = None) -> DeviceMesh:
    """The world as a ``(world // sp, sp)`` mesh named ``("dp", "sp")``; ``device_type`` defaults to cuda
    when the process group is NCCL, else cpu."""
    if not dist.is_initialized():
        raise RuntimeError("init_mesh needs torch.distributed initialized (run under torchrun)")
    world = dist.get_world_size()
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise ValueError(f"sp must be a positive int, got {sp!r}")
    if world % sp:
        raise ValueError(f"sp ({sp}) must divide the world size ({world}): each data-parallel rank owns one group")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=(DP, SP))


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
