"""Compiles the norm family's Triton kernels (RMSNorm and LayerNorm) for sm_90 (no GPU needed) and checks what
the design relies on: every variant compiles, none spills, and the persistent forward and backward loops
prefetch their rows into shared memory with cp.async (the bytes in flight are then not bounded by registers),
except the small-D backward variants whose multi-row tiles may span samples.

The host launchers run on CPU tensors with their kernels recorded (flagdit_kernels/bench/compile/recorder.py, which
also sizes the persistent grids for an H200); each launch is compiled as the JIT would specialize it. It runs
as a script in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest
import torch
from support.compile_subprocess import compiler_unavailable, run_script


@pytest.mark.skipif(compiler_unavailable() is not None, reason=str(compiler_unavailable()))
def test_norm_kernels_compile_for_sm90():
    out = run_script(__file__)
    assert "compiled 36" in out, out
    # Packs of 8 and of 4096 samples launch the same kernels with the same constexprs and get the same
    # binaries: neither the compile time nor the code depends on the number of samples (issue 25, item 4).
    assert "same binaries for 8 and 4096 samples: 4 launches" in out, out


def _compile_all() -> None:
    from flagdit_kernels.bench.compile.recorder import compile_launch, recording
    from flagdit_kernels.bench.compile.sass import access_widths, resource_usage, sass
    from flagdit_kernels.triton import norms as K

    names = ("_fwd_kernel", "_bwd_kernel", "_segment_sum_kernel")
    with recording(K, names) as launches:
        for d, dtype in ((72, torch.float32), (1000, torch.float16), (4096, torch.bfloat16)):
            x = torch.empty(64, d, dtype=dtype)
            w = torch.empty(d, dtype=torch.float32)
            cu = torch.tensor([0, 5, 5, 64], dtype=torch.int32)
            p = torch.empty(3, d, dtype=dtype)
            _, rstd = K.forward(x, w, 1e-5)
            K.backward(x, x, w, rstd)
            _, rstd = K.forward(x, None, 1e-5, mode=K.MODE_MODULATE, p1=p, p2=p, cu_seqlens=cu)
            K.backward(x, x, None, rstd, mode=K.MODE_MODULATE, p1=p, p2=p, cu_seqlens=cu)
            x3 = x.view(4, 16, d)
            _, rstd = K.forward(x3, w, 1e-5, mode=K.MODE_GATED, p1=x3, residual=x3, tanh_gate=d != 72)
            K.backward(x3, x3, w, rstd, mode=K.MODE_GATED, p1=x3, tanh_gate=d != 72)
            layer = dict(norm=K.NORM_LAYER, bias=w, mode=K.MODE_MODULATE, p1=p, p2=p, cu_seqlens=cu)
            _, rstd = K.forward(x, w, 1e-6, **layer)
            K.backward(x, x, w, rstd, **layer)
    for launch in launches:
        compiled = compile_launch(launch)
        assert resource_usage(compiled.asm["cubin"])["LOCAL"] == 0, f"{launch.label} spills"
        kw = launch.kwargs
        # A multi-row tile that may span samples sums its per-sample gradients in an inner loop, which the
        # pipeliner does not take: those (small-D) variants load their rows directly.
        spans_samples = (kw.get("SEG1") or kw.get("SEG2")) and kw.get("ROWS", 1) > 1
        if launch.label != "_segment_sum_kernel" and not spans_samples:
            assert access_widths(sass(compiled.asm["cubin"]))["LDGSTS"], (
                f"{launch.label} {launch.kwargs}: not prefetched"
            )
    print("compiled", len(launches))


def _same_binaries_for_any_sample_count() -> None:
    from flagdit_kernels.bench.compile.recorder import compile_launch, recording
    from flagdit_kernels.triton import norms as K

    names = ("_fwd_kernel", "_bwd_kernel", "_segment_sum_kernel")
    d, rows = 2304, 8192
    per_count = []
    for samples in (8, 4096):
        x = torch.empty(rows, d, dtype=torch.bfloat16)
        p = torch.empty(samples, d, dtype=torch.bfloat16)
        cu = torch.linspace(0, rows, samples + 1).round().to(torch.int32)
        with recording(K, names) as launches:
            _, rstd = K.forward(x, x[0], 1e-5, mode=K.MODE_MODULATE, p1=p, p2=p, cu_seqlens=cu)
            K.backward(x, x, x[0], rstd, mode=K.MODE_MODULATE, p1=p, p2=p, cu_seqlens=cu)
        per_count.append([(launch.label, launch.kwargs, compile_launch(launch).asm["cubin"]) for launch in launches])
    few, many = per_count
    assert len(few) == len(many), (len(few), len(many))
    for (label, kwargs, cubin), (label2, kwargs2, cubin2) in zip(few, many):
        assert (label, kwargs) == (label2, kwargs2), (label, kwargs, label2, kwargs2)
        assert cubin == cubin2, f"{label}: the binary depends on the number of samples"
    print(f"same binaries for 8 and 4096 samples: {len(few)} launches")


if __name__ == "__main__":
    _compile_all()
    _same_binaries_for_any_sample_count()
