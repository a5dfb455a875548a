"""The exchanges sequence parallelism needs, over collectives gloo and NCCL both have.

Two autograd functions, each forward one ``torch.distributed`` call and each backward its exact adjoint, so
gradients flow through them like through any op (torch's own ``torch.distributed.nn`` wrappers are
deprecated):

- :func:`all_to_all`: rows of ``x`` to every rank by counts (``all_to_all_single`` with split sizes); the
  backward sends the gradient rows back the same way reversed.
- :func:`all_gather_rows`: every rank's rows, in rank order (``all_gather``); the backward sums each rank's
  gradient of my rows (a reduce-scatter, written as an ``all_to_all_single`` because gloo has no
  reduce-scatter);

and :class:`RingHop`, a tensor to the next rank of the ring and the previous rank's in return
(``batch_isend_irecv``), started by the constructor and finished by :meth:`RingHop.wait`, so that compute runs
while it travels; not differentiable (the ring attention's autograd function moves its gradients itself).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: ProcessGroup):
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return _all_to_all(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return _all_to_all(grad, recv_counts, send_counts, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: ProcessGroup) -> torch.Tensor:
    """Sends rows ``x[sum(send_counts[:i]) : ...]`` to rank i of ``group`` and returns the rows received, rank
    i's first (``sum(recv_counts)`` of them). Differentiable."""
    return _AllToAll.apply(x, list(send_counts), list(recv_counts), group)


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        size = dist.get_world_size(ctx.group)
        rows = grad.shape[0] // size
        mine = _all_to_all(grad, [rows] * size, [rows] * size, ctx.group)
        return mine.view(size, rows, *grad.shape[1:]).sum(0), None


def all_gather_rows(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``(size * N, ...)``: every rank's ``x`` ``(N, ...)`` (the same N everywhere) in rank order. The backward
    hands each rank the sum over the group of the gradients of its rows."""
    return _AllGatherRows.apply(x, group)


class RingHop:
    """``RingHop(x, group).wait()`` is the previous rank's ``x``: the send to the next rank and the receive from
    the previous one (``batch_isend_irecv``) are posted by the constructor and run until :meth:`wait`, so that
    compute runs while ``x`` travels. ``x`` must stay unchanged until then. ``tag`` keeps two hops in flight
    between the same ranks apart (gloo matches messages by tag; NCCL by order, the same on every rank).
    Not differentiable: the ring attention's autograd function sends its gradients itself."""

    def __init__(self, x: torch.Tensor, group: ProcessGroup, tag: int = 0):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        self._sent = x.contiguous()  # the buffer in flight lives until wait()
        self._recv = torch.empty_like(self._sent)
        ops = [
            dist.P2POp(dist.isend, self._sent, group=group, tag=tag, group_peer=(rank + 1) % size),
            dist.P2POp(dist.irecv, self._recv, group=group, tag=tag, group_peer=(rank - 1) % size),
        ]
        self._pending = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        for work in self._pending:
            work.wait()
        self._pending, self._sent = [], None
        return self._recv
