"""Epilogue of the packed patch embedding: writes the learned placeholder embeddings over placeholder rows.

The Linear itself is a cuBLAS GEMM (bias fused in its epilogue); this kernel then overwrites, in place, the
rows whose ``kind`` is 1 ([nextline]) or 2 ([nextframe]) with rows 0 / 1 of the placeholder table. It reads
one byte per row and writes only placeholder rows, so the embedding costs the GEMM and nothing more (the
eager ``where(kind == 0, linear, table[kind - 1])`` reads and writes the whole (T, dim) output twice more).
Any other ``kind`` value leaves its row as the Linear wrote it (the reference's rule), so the table is read
only at rows 0 and 1 whatever ``kind`` holds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def placeholder_rows_kernel(
    out,  # (T, dim), modified in place at placeholder rows
    kind,  # int8 (T,)
    table,  # (2, dim) placeholder embeddings, same dtype as out
    total,
    dim,
    out_stride,
    table_stride,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.load(kind + rows, mask=rows < total, other=0).to(tl.int32)
    mask = ((k == 1) | (k == 2))[:, None] & (cols < dim)[None, :]
    emb = tl.load(table + (k - 1)[:, None] * table_stride + cols[None, :], mask=mask)
    tl.store(out + rows.to(tl.int64)[:, None] * out_stride + cols[None, :], emb, mask=mask)


def write_placeholder_rows(out, kind, table) -> None:
    """Overwrites ``out``'s placeholder rows (``kind != 0``) with ``table[kind - 1]``, in one launch."""
    total, dim = out.shape
    block_d = min(256, triton.next_power_of_2(dim))
    block_t = 32
    grid = (triton.cdiv(total, block_t), triton.cdiv(dim, block_d))
    placeholder_rows_kernel[grid](
        out, kind, table, total, dim, out.stride(0), table.stride(0), BLOCK_T=block_t, BLOCK_D=block_d
    )
