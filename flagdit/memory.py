"""What a training step holds for its backward, measured: the bytes autograd saves, counted by saved-tensor hooks.

``with SavedBytes(model) as saved: loss = ...`` records every tensor autograd saves for the backward inside the
block (on any device, under any wrapper: DDP, FSDP2, sequence parallelism, activation checkpointing);
``saved.bytes`` after the forward is the size of their storages, each storage counted once however many saved
tensors view it (a weight and its transpose, the views a block saves of one activation). The model's own
parameters are not counted (they live whether or not a backward follows); what FSDP2 gathered for the forward
and freed after it is gone by the time ``bytes`` is read, so it counts only where autograd really holds it.

Activation checkpointing needs no special case: a checkpointed region saves its inputs through these hooks and
packs what it would have saved through its own, so a recomputed activation is never counted.

``saved.bytes`` must be read before the backward starts: until then the meter holds a reference to every saved
tensor (the backward could free them one by one otherwise), and reading it lets go of them.
"""

from __future__ import annotations

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


class SavedBytes:
    """Counts the bytes of the storages autograd saves inside ``with`` (see the module docstring)."""

    def __init__(self, model: nn.Module | None = None):
        self._model = model
        self._saved: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._bytes: int | None = None

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Detached: what autograd stores must not refer to t (t's graph may refer to it: a reference cycle that
        # would keep the activations alive past the backward). A detached tensor shares t's storage.
        t = t.detach()
        self._saved.append(t)
        return t

    def __enter__(self) -> SavedBytes:
        self._saved, self._bytes = [], None
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _parameter_storages(self) -> set[tuple[str, int]]:
        """The storages of the model's parameters as they are now: FSDP2 registers the gathered ones while
        its module is unsharded (the root module stays so after the forward), the local shards otherwise."""
        if self._model is None:
            return set()
        params = (p.to_local() if hasattr(p, "to_local") else p for p in self._model.parameters())
        return {_storage_key(p) for p in params}

    @property
    def bytes(self) -> int:
        """Bytes of the distinct storages saved (read after the forward, before the backward)."""
        if self._bytes is None:
            sizes, exclude = {}, self._parameter_storages()
            for t in self._saved:
                key = _storage_key(t)
                if key not in exclude and t.device.type != "meta":
                    sizes[key] = t.untyped_storage().nbytes()
            self._bytes, self._saved = sum(sizes.values()), []
        return self._bytes
