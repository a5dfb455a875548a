"""The packing Triton kernels compile for sm_90 (Triton's bundled ptxas; no GPU needed).

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and accepts code that the compiler rejects (it
once let the kernels read plain module-level ints as globals). This ahead-of-time compile of representative
specializations catches that class of error on machines without a GPU; with a GPU, the kernel tests compile
the kernels for real.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flagdit_kernels.triton import embed as embed_kernels  # noqa: E402
from flagdit_kernels.triton import packing as packing_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile them")

FLAGS = ("P", "P_BLOCK", "BLOCK_T", "BLOCK_C", "LOG2_ITEMS", "NEXTLINE", "NEXTFRAME", "CHANNELS_LAST", "UNIT_W")


def _compile(fn, signature: dict, constexprs: dict):
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    return triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)
    )


def _flags(p: int, channels: int, channels_last: bool, unit_w: bool) -> dict:
    p_block, block_c, block_t = packing_kernels._blocks(channels, p)
    return dict(zip(FLAGS, (p, p_block, block_t, block_c, 3, 1, 1, channels_last, unit_w)))


@pytest.mark.parametrize(("p", "channels", "channels_last", "unit_w"), [(2, 16, False, True), (3, 5, True, False)])
def test_pack_kernel_compiles(p, channels, channels_last, unit_w):
    signature = {
        "table": "*i64",
        "out": "*bf16",
        "positions": "*i32",
        "kind": "*i8",
        "patch_rows": "*i64",
        "cu_seqlens": "*i32",
        "n_items": "i32",
        "total_tokens": "i32",
        "channels": "i32",
        "out_row_stride": "i32",
    }
    flags = {**_flags(p, channels, channels_last, unit_w), "WRITE_LAYOUT": True}
    kernel = _compile(packing_kernels.pack_kernel, signature, flags)
    assert kernel.metadata.shared > 0  # the (latent tile) -> (token rows) transpose is staged in shared memory


@pytest.mark.parametrize(("p", "channels", "channels_last"), [(2, 16, True), (1, 4, False)])
def test_unpack_kernel_compiles(p, channels, channels_last):
    signature = {
        "table": "*i64",
        "tokens_ptr": "*fp16",
        "n_items": "i32",
        "total_tokens": "i32",
        "channels": "i32",
        "row_stride": "i32",
        "col_stride": "i32",
    }
    _compile(packing_kernels.unpack_kernel, signature, _flags(p, channels, channels_last, True))


def test_embed_epilogue_compiles():
    signature = {
        "out": "*bf16",
        "kind": "*i8",
        "table": "*bf16",
        "total": "i32",
        "dim": "i32",
        "out_stride": "i32",
        "table_stride": "i32",
    }
    _compile(embed_kernels.placeholder_rows_kernel, signature, dict(BLOCK_T=32, BLOCK_D=256))
