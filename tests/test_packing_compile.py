"""The packing Triton kernels compile for sm_90 (Triton's bundled ptxas; no GPU needed), and the compile shows
what they were built for: 16-byte accesses on both sides of an aligned bf16 batch, the transpose through
shared memory, no spills.

The interpreter (TRITON_INTERPRET=1) runs kernels as numpy and accepts code that the compiler rejects. Here the
host launchers run on CPU tensors with their kernels recorded (flagdit_kernels/bench/compile/recorder.py), and
each launch is compiled ahead of time as the JIT would specialize it. It runs as a script in a subprocess without
TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest
import torch
from support.compile_subprocess import compiler_unavailable, run_script


@pytest.mark.skipif(compiler_unavailable() is not None, reason=str(compiler_unavailable()))
def test_packing_kernels_compile_for_sm90():
    out = run_script(__file__)
    assert out.count("compiled ") == 11, out


def _compile_all() -> None:
    from flagdit_kernels._conventions import frames_hw, item_shapes
    from flagdit_kernels.bench.compile.recorder import compile_launch, recording
    from flagdit_kernels.bench.compile.sass import access_widths, resource_usage, sass
    from flagdit_kernels.triton import embed as E
    from flagdit_kernels.triton import packing as K

    def check(launches, aligned_bf16: bool = False):
        for launch in launches:
            compiled = compile_launch(launch)
            res = resource_usage(compiled.asm["cubin"])
            assert res["LOCAL"] == 0, f"{launch.label} spills"
            widths = access_widths(sass(compiled.asm["cubin"]))
            if aligned_bf16:  # latent side and token side both move 16-byte vectors
                assert widths["LDG"]["16B"] and widths["STG"]["16B"], f"{launch.label}: {widths}"
            if launch.label == "pack_kernel":
                assert compiled.metadata.shared > 0, "the latent -> token-row transpose goes through shared memory"
            print(f"compiled {launch.label}")

    # Aligned bf16 latents, p = 2, 16 channels: the flat, vectorized paths, both vector orders, with layout.
    shapes = [(16, 64, 64), (16, 3, 32, 48)]
    latents = [torch.empty(s, dtype=torch.bfloat16) for s in shapes]
    fhw = [frames_hw(s) for s in shapes]
    with recording(K, ("pack_kernel", "unpack_kernel")) as rec:
        patches = K.pack(latents, fhw, 2, True, True, False, [], with_layout=True)[0]
        K.pack(latents, fhw, 2, False, True, True, [], with_layout=False)
        K.unpack(patches, item_shapes(shapes), 2, 16, True, True, True, [])
        # Tile-major order: the same segments, scattered token rows, each still one 16-byte-vector run.
        K.pack(latents, fhw, 2, True, True, False, [2, 4, 4], with_layout=True)
        K.unpack(patches, item_shapes(shapes), 2, 16, True, True, True, [2, 4, 4])
    check(rec, aligned_bf16=True)
    # p = 3 and 5 channels, a transposed latent (W stride != 1), fp32: the 4-D gather paths.
    latents = [torch.empty(5, 9, 6).transpose(1, 2), torch.empty(5, 2, 6, 9)]
    shapes = [tuple(x.shape) for x in latents]
    fhw = [frames_hw(s) for s in shapes]
    with recording(K, ("pack_kernel", "unpack_kernel")) as rec:
        patches = K.pack(latents, fhw, 3, True, False, True, [], with_layout=True)[0]
        K.unpack(patches, item_shapes(shapes), 3, 5, True, False, False, [])
        K.unpack(torch.empty(45, patches.shape[0]).t(), item_shapes(shapes), 3, 5, True, False, True, [])
    check(rec)
    # Channel blocks (150 channels) and the embedding epilogue.
    latents = [torch.empty(150, 4, 6, dtype=torch.float16)]
    with recording(K, ("pack_kernel", "unpack_kernel")) as rec:
        patches = K.pack(latents, [(1, 4, 6)], 2, True, True, True, [], with_layout=False)
        K.unpack(patches, [3, 1, 4, 6], 2, 150, True, True, True, [])
    check(rec)
    out = torch.empty(64, 72, dtype=torch.bfloat16)
    with recording(E, ("placeholder_rows_kernel",)) as rec:
        E.write_placeholder_rows(out, torch.zeros(64, dtype=torch.int8), torch.empty(2, 72, dtype=torch.bfloat16))
    check(rec)


if __name__ == "__main__":
    _compile_all()
