"""Padded ``(B, L)`` batches seen as packed varlen rows, built on the device with no host sync.

diffusers hands every block padded tensors ``(B, L, ...)`` and a padding mask. Our ops take packed rows and
``cu_seqlens``. Dropping the masked tokens would make the row count depend on the mask's values (a host sync
per mask, and a graph break under ``torch.compile``), so the rows keep every token and the mask decides only
the order and the sequence boundaries:

- without a mask, packed row ``b*L + i`` is token ``(b, i)``: one sequence of ``L`` tokens per sample (a view);
- with a mask, each sample's rows are reordered on the device (a stable sort) so that its real tokens come
  first, and each sample becomes two sequences: its real tokens, then its masked ones. Real tokens attend to
  real tokens only; the masked ones see each other, and their results are dropped on unpack, where the padded
  input passes through. Per-sample tensors (adaLN scales, gates) are repeated for the two sequences.

``max_seqlen`` is ``L``, read from the shape (an upper bound, which the kernels accept).

:class:`LayoutCache` lets the blocks of one model call share the layouts and the packed rotary tables. It is
open only while the patched model's forward runs (:meth:`LayoutCache.scope`), so a mask edited in place
between two calls is always seen, under ``torch.inference_mode()`` too, where tensors have no version counter.
While ``torch.compile`` traces, nothing is cached: each block builds its layout in the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .. import VarlenLayout


@dataclass(eq=False)
class PaddedLayout:
    """A padded ``(batch, length)`` batch as packed rows (see the module docstring).

    ``order``: packed row -> flattened padded token (None: the identity); ``inverse``: its inverse;
    ``keep``: ``(B*L, 1)`` bool, the real tokens (None: all are); ``split``: two sequences per sample;
    ``seqs``: the offsets every op receives.
    """

    batch: int
    length: int
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    keep: torch.Tensor | None
    split: bool
    seqs: VarlenLayout

    @classmethod
    def build(cls, mask: torch.Tensor | None, batch: int, length: int, device: torch.device, split: bool):
        """The layout of a ``(batch, length)`` batch; ``split`` (forced by a mask) gives two sequences per sample."""
        total = batch * length
        if mask is None:
            per_sample = 2 if split else 1
            bounds = torch.arange(per_sample * batch + 1, device=device, dtype=torch.int32) + per_sample - 1
            cu = bounds // per_sample * length
            return cls(batch, length, None, None, None, split, VarlenLayout.from_cu_seqlens(cu, total, length))
        keep = mask.reshape(batch, length).to(device=device, dtype=torch.bool)
        starts = torch.arange(batch, device=device) * length
        order = (torch.argsort((~keep).to(torch.int8), dim=1, stable=True) + starts[:, None]).flatten()
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(total, device=device))
        ends = (starts + length).to(torch.int32)
        middles = starts.to(torch.int32) + keep.sum(1, dtype=torch.int32)
        cu = torch.cat([ends.new_zeros(1), torch.stack([middles, ends], 1).flatten()])
        seqs = VarlenLayout.from_cu_seqlens(cu, total, length)
        return cls(batch, length, order, inverse, keep.reshape(total, 1), True, seqs)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, *rest)`` -> ``(B*L, *rest)`` in packed order (a view without a mask)."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        return flat if self.order is None else flat.index_select(0, self.order)

    def unpack(self, packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pack`; masked positions take ``like``'s values."""
        if self.order is None:
            return packed.view(like.shape)
        flat = like.reshape(self.batch * self.length, *like.shape[2:])
        keep = self.keep.view(-1, *([1] * (flat.dim() - 1)))
        return torch.where(keep, packed.index_select(0, self.inverse).to(like.dtype), flat).view(like.shape)

    def per_sequence(self, per_sample: torch.Tensor) -> torch.Tensor:
        """A ``(B, ...)`` per-sample tensor as one row per sequence of :attr:`seqs`."""
        return per_sample.repeat_interleave(2, dim=0) if self.split else per_sample


class LayoutCache:
    """Layouts and packed rotary tables shared by the blocks of one model call (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[tuple[object, ...], object]] | None = None

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Caching is on inside (one model forward); entries are dropped when it closes."""
        if torch.compiler.is_compiling() or self._entries is not None:  # traced, or a nested call: no new scope
            yield
            return
        self._entries = {}
        try:
            yield
        finally:
            self._entries = None

    def _get(self, key: tuple, alive: tuple[object, ...], build: Callable[[], object]):
        if self._entries is None or torch.compiler.is_compiling():
            return build()
        entry = self._entries.get(key)
        if entry is None:  # the keyed objects live as long as the entry, so their ids stay theirs in the scope
            entry = self._entries[key] = (alive, build())
        return entry[1]

    def layout(
        self, mask: torch.Tensor | None, batch: int, length: int, device: torch.device, split: bool
    ) -> PaddedLayout:
        key = ("layout", None if mask is None else id(mask), batch, length, str(device), split)
        tensors = () if mask is None else (mask,)
        return self._get(key, tensors, lambda: PaddedLayout.build(mask, batch, length, device, split))

    def rotary(self, rotary: torch.Tensor, layout: PaddedLayout, convert: Callable) -> torch.Tensor:
        """``convert(rotary, layout)`` (the packed ``(B*L, Dh/2, 2)`` table), once per rotary tensor and layout."""
        key = ("rotary", id(rotary), id(layout))
        return self._get(key, (rotary, layout), lambda: convert(rotary, layout))
