"""Patch embedding of a packed sequence: the Linear on patch rows, learned embeddings at placeholder rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_packed(
    patches: torch.Tensor,
    kind: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    placeholder_embeddings: torch.Tensor,
) -> torch.Tensor:
    """``(T, dim)``: ``patches @ weight.T + bias`` at patch rows (kind 0); ``placeholder_embeddings[kind - 1]``
    at placeholder rows (row 0 = [nextline], row 1 = [nextframe]). The Linear never reaches a placeholder row,
    so those rows of ``patches`` get no gradient and contribute none to ``weight`` / ``bias``."""
    x = F.linear(patches, weight, bias)
    slot = (kind.long() - 1).clamp(min=0)
    return torch.where((kind == 0).unsqueeze(-1), x, placeholder_embeddings[slot])
