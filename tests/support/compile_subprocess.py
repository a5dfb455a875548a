"""Plumbing of the tests that compile kernels for sm_90 without a GPU: whether this machine can, and running a
test file as a script, or a snippet (``compile_rows``), in a subprocess without ``TRITON_INTERPRET`` (the
recorder and compiler are ``flagdit_kernels.bench.compile.recorder`` and ``flagdit_kernels.bench.compile.sass``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def compiler_unavailable() -> str | None:
    """Why kernels cannot be compiled ahead of time here (None when they can)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"this triton has no ahead-of-time compile API: {exc}"
    if torch.cuda.is_available():
        return "on a GPU the kernel tests compile the kernels for real"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        return "triton's bundled ptxas is missing"
    return None


def run_script(path: str) -> str:
    """Runs a test file as a script without TRITON_INTERPRET (under the interpreter ``@triton.jit`` yields
    functions the compiler cannot take); returns its stdout, asserting it succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done.stdout


def compile_rows(code: str) -> list[dict]:
    """Runs ``code`` in a child Python without TRITON_INTERPRET, from the repository root (a compiler abort, such
    as an MLIR assertion, fails the test, not the run), and returns the JSON list it prints as its last line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
