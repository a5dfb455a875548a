"""``VarlenLayout``: where each sample's tokens sit in a packed ``(T, ...)`` batch, validated once.

A model packs a batch once and then calls a dozen ops per block on the same tokens. Each op that takes
``cu_seqlens`` would check the offsets again (a host copy of them on CPU tensors, or on the GPU with
``FLAGDIT_KERNELS_VALIDATE=1``) and rebuild the per-token sample index; a :class:`VarlenLayout` is checked
when it is built and ops that receive it (wherever ``cu_seqlens=`` / ``text_cu_seqlens=`` is accepted) only
compare its token count with their inputs'. Raw tensors keep working as before.

It is a plain value type whose fields must agree, and every way of building one checks that they do:
``__post_init__`` runs for the constructor, :meth:`VarlenLayout.from_cu_seqlens` and ``dataclasses.replace``
alike (dtypes, shapes and devices always; values where values are checked, as for raw offsets: offsets from 0,
non-decreasing, ending at the token count, ``sample_index`` what the offsets give each token, ``max_seqlen``
covering the longest sequence). Kernels never read ``sample_index``: every backend finds a token's sample
from ``cu_seqlens`` itself, so a layout whose values went unchecked (GPU tensors without
``FLAGDIT_KERNELS_VALIDATE``) still gives the same result on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_cu_seqlens, check_max_seqlen, check_tensor, values_checked


def _sample_index(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The sample of every token of valid offsets (int64 on the offsets' device, no host sync)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    samples = torch.arange(lengths.shape[0], device=cu_seqlens.device)
    return torch.repeat_interleave(samples, lengths, output_size=num_tokens)


@dataclass(frozen=True)
class VarlenLayout:
    """The packed layout of one batch. Build it with :meth:`from_cu_seqlens` (which validates it).

    ``cu_seqlens`` int32 ``(B+1,)``: sample b owns tokens ``cu_seqlens[b]:cu_seqlens[b+1]``; ``max_seqlen``:
    the longest sample (a Python int: kernels need no host sync); ``sample_index`` int64 ``(T,)``: the sample of
    every token, on the offsets' device; ``positions``: the tokens' grid positions where known (``fk.pack``'s
    ``(T, 3)`` (frame, row, col)), else None.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    sample_index: torch.Tensor
    positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        """Checks that the fields agree (see the module docstring); ``dataclasses.replace`` runs it too."""
        check_tensor("cu_seqlens", self.cu_seqlens, ndim=1, dtypes=(torch.int32,))
        device = self.cu_seqlens.device
        check_tensor("sample_index", self.sample_index, ndim=1, dtypes=(torch.int64,), device=device)
        num_tokens = self.sample_index.shape[0]
        sync = values_checked(device)
        tokens_name = "the token count (sample_index.shape[0])"
        check_cu_seqlens("cu_seqlens", self.cu_seqlens, num_tokens, device, total_name=tokens_name, sync=sync)
        check_max_seqlen("max_seqlen", self.max_seqlen, self.cu_seqlens, sync=sync)
        if self.positions is not None:
            check_tensor("positions", self.positions, ndim=2, dtypes=None, device=device)
            if self.positions.shape[0] != num_tokens:
                raise ValueError(
                    f"positions must have one row per token ({num_tokens}), got {tuple(self.positions.shape)}"
                )
        if sync and not torch.equal(self.sample_index, _sample_index(self.cu_seqlens, num_tokens)):
            raise ValueError(
                "sample_index must hold the sample cu_seqlens gives each token (build layouts with "
                "VarlenLayout.from_cu_seqlens, or replace cu_seqlens and sample_index together)"
            )

    @property
    def num_tokens(self) -> int:
        return self.sample_index.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor,
        num_tokens: int,
        max_seqlen: int | None = None,
        positions: torch.Tensor | None = None,
    ) -> VarlenLayout:
        """Validates the offsets of ``num_tokens`` packed tokens once and builds the per-token sample index.

        ``max_seqlen`` None computes it (one host sync; pass it when known, e.g. ``Packed.max_seqlen``).
        Offset values are checked as ``fk.varlen_attention`` checks them (CPU tensors, or
        ``FLAGDIT_KERNELS_VALIDATE=1``).
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__} {num_tokens!r}")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
        device = cu_seqlens.device
        check_cu_seqlens("cu_seqlens", cu_seqlens, num_tokens, device, total_name="num_tokens")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return cls(cu_seqlens, max_seqlen, _sample_index(cu_seqlens, num_tokens), positions)


def check_layout(name: str, layout: VarlenLayout, num_tokens: int, tokens_name: str, device: torch.device) -> None:
    """What an op checks of a :class:`VarlenLayout` (built valid): that it describes its ``num_tokens`` tokens."""
    if layout.num_tokens != num_tokens:
        raise ValueError(f"{name} describes {layout.num_tokens} tokens but {tokens_name} is {num_tokens}")
    if layout.cu_seqlens.device != device:
        raise ValueError(f"{name} is on {layout.cu_seqlens.device} but the other inputs are on {device}")
