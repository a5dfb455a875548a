"""One varlen attention call as the launchers take it (launch.py): the custom ops (ops/attention.py) build it once
from their arguments, so the tensors of a call travel as one object instead of a restated argument list."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Problem(NamedTuple):
    """q ``(T, H, Dh)``, k / v ``(T, Hkv, Dh)`` (``(Tk, Hkv, Dh)`` with ``cu_seqlens_k``) packed by ``cu_seqlens``
    (launch.py has the layout); the gated text branch (``text_k`` / ``text_v`` packed by ``text_cu_seqlens``,
    ``tanh_gate`` fp32 ``(H,)``: the gate through tanh) or None; ``freqs`` the RoPE table or None; a
    cross-attention call's key offsets; a tile-sparse call's tables (sparse.lists). In the backward, q and k are
    the forward's rotated copies when the call has RoPE.

    ``offsets_repaired``: the offsets are the forward's repaired ones (offsets.py; its ``offsets`` output), so
    the backward launches them as they are instead of repairing them again. Only offsets that came out of the
    repair may be marked so: the kernels' bounds rest on it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    softmax_scale: float
    text_k: torch.Tensor | None = None
    text_v: torch.Tensor | None = None
    text_cu_seqlens: torch.Tensor | None = None
    tanh_gate: torch.Tensor | None = None
    freqs: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_k: int | None = None
    sparse_lists: torch.Tensor | None = None
    sparse_sizes: list[int] | None = None
    offsets_repaired: bool = False

    @property
    def has_text(self) -> bool:
        return self.text_k is not None
