"""The attention kernels lower to an sm_90 cubin (Triton's NVIDIA backend + bundled ptxas; no GPU needed).

The CPU interpreter never runs Triton's layout, pipelining or PTX passes; this compiles every kernel variant
(self/text, RoPE on/off, Dh 72 padded to 128) for Hopper in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend",
)


def test_attention_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = (
        "from flagdit_kernels.triton.compile_check import compile_all\n"
        "print('\\n'.join(compile_all(90, head_dims=(72,), report=False)))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 9 and all(": ok" in line for line in lines), res.stdout
