"""Compiles the RoPE Triton kernels for an H100/H200 (sm_90) without a GPU.

The interpreter runs kernels as NumPy and never sees Triton's compiler, so a kernel can pass every
interpreted test and still fail to compile. Here the host wrappers run on CPU tensors with the kernels
replaced by recorders, and each recorded launch is compiled ahead of time to a cubin with Triton's bundled
ptxas. This runs in a subprocess because ``TRITON_INTERPRET=1`` (set for the other tests) swaps the kernels
for interpreted functions at import time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import flagdit_kernels.triton.rope as K

    TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    for name in ("_rope_kernel", "_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel"):
        setattr(K, name, Recorder(getattr(K, name)))

    dt = torch.bfloat16
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

    target = GPUTarget("cuda", 90, 32)
    for fn, args, kwargs in launches:
        # Mirror the JIT's specialization: ints equal to 1 become constants, 16-aligned pointers and
        # multiples of 16 get divisibility hints (that is what lets loads vectorize).
        values = dict(zip(fn.arg_names, args))
        values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
        options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        signature, constants, attrs = {}, {}, {}
        for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
            v = values[name]
            if param.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
                signature[name], constants[name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                signature[name] = "*" + TYPES[v.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, int):
                signature[name] = "i64" if abs(v) >= 2**31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "fp32"
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target, options=options)
        assert compiled.asm["cubin"], fn.__name__
    print("compiled", len(launches))
    """
)


def _compiler_available() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"this triton has no ahead-of-time compile API: {exc}"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        return "triton's bundled ptxas is missing"
    return None


@pytest.mark.skipif(_compiler_available() is not None, reason=str(_compiler_available()))
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled" in result.stdout
