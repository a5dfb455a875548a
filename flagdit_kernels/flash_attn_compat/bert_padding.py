"""flash-attn's ``flash_attn.bert_padding`` helpers (2.6 - 2.8 signatures): padded ``(B, S, ...)`` batches to
packed rows and back. Plain differentiable torch ops (index_select / index_copy), no host sync but the one
``unpad_input`` needs for ``max_seqlen_in_batch`` (a Python int, as in flash-attn)."""

from __future__ import annotations

import torch

__all__ = ["index_first_axis", "pad_input", "unpad_input"]


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis: ``(N, ...)`` -> ``(len(indices), ...)``."""
    return input.reshape(input.shape[0], -1).index_select(0, indices).reshape(indices.shape[0], *input.shape[1:])


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask: torch.Tensor | None = None):
    """``(B, S, ...)`` and a ``(B, S)`` mask (1 = keep) -> ``(hidden (nnz, ...), indices (nnz,) int64 into the
    flattened B*S tokens, cu_seqlens (B+1,) int32, max_seqlen_in_batch int, seqused (B,) int32)``.
    ``unused_mask`` marks tokens kept in the rows but not counted in ``seqused`` (flash-attn's meaning)."""
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max())
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    rows = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(rows, indices), indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: ``(nnz, ...)`` rows -> ``(batch, seqlen, ...)``, zeros elsewhere."""
    flat = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    return flat.index_copy(0, indices, hidden_states).view(batch, seqlen, *hidden_states.shape[1:])
