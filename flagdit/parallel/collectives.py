"""The three exchanges sequence parallelism needs, as autograd functions over ``torch.distributed`` collectives.

Each forward is one ``torch.distributed`` call and each backward its exact adjoint, so gradients flow through
them like through any op (torch's own ``torch.distributed.nn`` wrappers are deprecated; these are the three
we need, over the collectives gloo and NCCL both have):

- :func:`all_to_all`: rows of ``x`` to every rank by counts (``all_to_all_single`` with split sizes); the
  backward sends the gradient rows back the same way reversed.
- :func:`all_gather_rows`: every rank's rows, in rank order (``all_gather``); the backward sums each rank's
  gradient of my rows (a reduce-scatter, written as an ``all_to_all_single`` because gloo has no
  reduce-scatter).
- :class:`RingShift`: a tensor to the next rank of the ring and the previous rank's in return
  (``batch_isend_irecv``), started by the constructor and finished by :meth:`RingShift.wait`, so that compute
  runs while it travels; the backward sends the gradient one rank back.
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


def _exchange(send: torch.Tensor, recv: torch.Tensor, group: ProcessGroup, step: int) -> list:
    """Starts sending ``send`` ``step`` ranks up the ring and receiving into ``recv`` from ``step`` ranks down."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    ops = [
        dist.P2POp(dist.isend, send, group=group, group_peer=(rank + step) % size),
        dist.P2POp(dist.irecv, recv, group=group, group_peer=(rank - step) % size),
    ]
    return dist.batch_isend_irecv(ops)


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, pending):
        ctx.group = group
        recv = torch.empty_like(x)
        pending.extend(_exchange(x, recv, group, 1))  # in flight: RingShift.wait() finishes it
        return recv

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        for work in _exchange(grad.contiguous(), out, ctx.group, -1):
            work.wait()
        return out, None, None


class RingShift:
    """``RingShift(x, group).wait()`` is the previous rank's ``x``; the send and receive run in between.

    ``x`` must stay unchanged until :meth:`wait` returns (it is being sent). Differentiable: the backward
    returns the gradient to the rank it came from (synchronously: autograd runs one node at a time).
    """

    def __init__(self, x: torch.Tensor, group: ProcessGroup):
        self._pending: list = []
        self._sent = x.contiguous()  # the buffer in flight lives until wait()
        self._out = _Shift.apply(self._sent, group, self._pending)

    def wait(self) -> torch.Tensor:
        for work in self._pending:
            work.wait()
        self._pending.clear()
        self._sent = None
        return self._out
