"""Compiles the RoPE Triton kernels for an H100/H200 (sm_90) without a GPU.

The interpreter runs kernels as NumPy and never sees Triton's compiler, so a kernel can pass every
interpreted test and still fail to compile. Here the host wrappers run on CPU tensors with the kernels
replaced by recorders (flagdit_kernels/bench/compile/recorder.py), and each recorded launch is compiled ahead
of time to a cubin with Triton's bundled ptxas, specialized as the JIT would. This runs as a script in a
subprocess because ``TRITON_INTERPRET=1`` (set for the other tests) swaps the kernels for interpreted
functions at import time.
"""

from __future__ import annotations

import pytest
import torch
from support.compile_subprocess import compiler_unavailable, run_script


@pytest.mark.skipif(compiler_unavailable() is not None, reason=str(compiler_unavailable()))
def test_kernels_compile_for_sm90():
    out = run_script(__file__)
    assert "compiled 20" in out, out


def _compile_all() -> None:
    import flagdit_kernels.triton.rope as K
    from flagdit_kernels.bench.compile.recorder import compile_launch, recording
    from flagdit_kernels.bench.compile.sass import resource_usage

    names = ("_rope_kernel", "_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel")
    dt = torch.bfloat16
    with recording(K, names) as launches:
        for h, hk, dh in ((32, 8, 72), (32, 32, 128)):
            f = torch.randn(16, dh // 2, 2)
            qkv = torch.randn(16, h + 2 * hk, dh, dtype=dt)  # q, k as views of a fused projection
            q, k = qkv[:, :h], qkv[:, h : h + hk]
            for interleaved in (True, False):
                K.apply_rope(q, f, interleaved)
                for norm in ("layer_norm", "rms_norm", "none") if dh == 72 else ("layer_norm",):
                    wq = h * dh if norm == "layer_norm" else dh
                    wk = hk * dh if norm == "layer_norm" else dh
                    ps = (torch.randn(wq), torch.randn(wq), torch.randn(wk), None) if norm != "none" else (None,) * 4
                    K.qk_norm_rope_fwd(q, k, f, *ps, norm, 1e-5, interleaved)
                    K.qk_norm_rope_bwd(q, k, q, k, f, *ps, norm, 1e-5, interleaved)
    for launch in launches:
        compiled = compile_launch(launch)
        assert resource_usage(compiled.asm["cubin"])["LOCAL"] == 0, f"{launch.label} spills"
    print("compiled", len(launches))


if __name__ == "__main__":
    _compile_all()
