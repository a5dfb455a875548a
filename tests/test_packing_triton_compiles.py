"""The packing Triton kernels compile for sm_90 (Triton's bundled ptxas; no GPU needed).

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and accepts code that the compiler rejects (it
once let the kernels read plain module-level ints as globals). This ahead-of-time compile of representative
specializations catches that class of error on machines without a GPU; with a GPU, the kernel tests compile
the kernels for real. It runs in a subprocess without TRITON_INTERPRET, because under the interpreter
``@triton.jit`` yields functions the compiler cannot take.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = (
    "P",
    "P_BLOCK",
    "BLOCK_T",
    "BLOCK_C",
    "LOG2_ITEMS",
    "NEXTLINE",
    "NEXTFRAME",
    "CHANNELS_LAST",
    "UNIT_W",
    "FLAT_ROWS",
)
PACK_SIGNATURE = {
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
UNPACK_SIGNATURE = {
    "table": "*i64",
    "tokens_ptr": "*fp16",
    "n_items": "i32",
    "total_tokens": "i32",
    "channels": "i32",
    "row_stride": "i32",
    "col_stride": "i32",
}
EMBED_SIGNATURE = {
    "out": "*bf16",
    "kind": "*i8",
    "table": "*bf16",
    "total": "i32",
    "dim": "i32",
    "out_stride": "i32",
    "table_stride": "i32",
}


def _compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flagdit_kernels.triton import embed as embed_kernels
    from flagdit_kernels.triton import packing as packing_kernels

    def build(fn, signature, constexprs, name):
        signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        print(f"compiled {name}: shared={kernel.metadata.shared}")
        return kernel

    def flags(p, channels, channels_last, unit_w):
        p_block, block_c, block_t = packing_kernels._blocks(channels, p)
        flat = packing_kernels._flat_rows(channels, p, p_block, block_c, channels_last)
        return dict(zip(FLAGS, (p, p_block, block_t, block_c, 3, 1, 1, channels_last, unit_w, flat)))

    for p, channels, channels_last, unit_w in ((2, 16, False, True), (3, 5, True, False)):  # flat, 4-D
        kernel = build(
            packing_kernels.pack_kernel,
            PACK_SIGNATURE,
            {**flags(p, channels, channels_last, unit_w), "WRITE_LAYOUT": True},
            f"pack p={p}",
        )
        assert kernel.metadata.shared > 0  # the latent tile -> token rows transpose goes through shared memory
    # (2, 16, *): a token row run per block (FLAT_ROWS); (3, *): padded patch tiles (4-D path).
    for p, channels, channels_last in ((2, 16, True), (3, 4, False)):
        build(packing_kernels.unpack_kernel, UNPACK_SIGNATURE, flags(p, channels, channels_last, True), f"unpack p={p}")
    build(embed_kernels.placeholder_rows_kernel, EMBED_SIGNATURE, dict(BLOCK_T=32, BLOCK_D=256), "embed epilogue")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile the kernels for real")
def test_packing_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("compiled ") == 5, done.stdout


if __name__ == "__main__":
    _compile_all()
