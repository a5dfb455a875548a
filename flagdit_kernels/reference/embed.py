"""Patch embedding of a packed sequence: the Linear on patch rows, learned embeddings at placeholder rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embed_packed"]


def embed_packed(
    patches: torch.Tensor,
    kind: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    placeholder_embeddings: torch.Tensor,
) -> torch.Tensor:
    """``(T, dim)``: ``placeholder_embeddings[kind - 1]`` at placeholder rows (kind 1 = [nextline] takes row 0,
    kind 2 = [nextframe] row 1), ``patches @ weight.T + bias`` at every other row (kind 0; a kind outside
    {0, 1, 2} is a patch row too, on every backend, so no value reads outside the table). The Linear never
    reaches a placeholder row, so those rows of ``patches`` get no gradient and contribute none to ``weight`` /
    ``bias``."""
    x = F.linear(patches, weight, bias)
    slot, is_placeholder = placeholder_slots(kind)
    return torch.where(is_placeholder.unsqueeze(-1), placeholder_embeddings[slot], x)


def placeholder_slots(kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of the placeholder table, is a placeholder row) per token: kinds 1 and 2 are placeholders (rows 0
    and 1); any other value is a patch row (its slot is 0, unused)."""
    is_placeholder = (kind == 1) | (kind == 2)
    return torch.where(is_placeholder, kind.long() - 1, 0), is_placeholder
