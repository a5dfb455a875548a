"""Runs a snippet in a fresh interpreter, so that a crash (SIGSEGV, SIGFPE, SIGBUS, an abort, a sanitizer
report) fails the test that asked for it instead of killing the whole pytest run.

The child imports the package from this checkout and inherits the environment (``TRITON_INTERPRET``, and under
the sanitizer CI job ``LD_PRELOAD`` / ``ASAN_OPTIONS``, so a memory error there exits non-zero with its report).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULT_MARK = "@@result@@ "


def run_isolated(code: str, *, timeout: float = 300, env: dict[str, str] | None = None) -> object:
    """Runs ``code`` (dedented) in a new Python process and returns what it passed to ``report(obj)`` (JSON).

    Fails the calling test with the child's stderr when it dies of a signal, exits non-zero or reports nothing.
    """
    prelude = (
        "import json as _json\n"
        f"def report(obj):\n    print({RESULT_MARK!r} + _json.dumps(obj), flush=True)\n"
    )  # fmt: skip
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=ROOT,
    )
    tail = proc.stderr[-4000:]
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise AssertionError(f"the child process died of {name}:\n{tail}")
    if proc.returncode != 0:
        raise AssertionError(f"the child process exited with {proc.returncode}:\n{tail}")
    results = [line[len(RESULT_MARK) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not results:
        raise AssertionError(f"the child process reported nothing:\n{proc.stdout[-2000:]}\n{tail}")
    return json.loads(results[-1])


def run_pytest_isolated(path: str, *args: str, timeout: float = 900) -> None:
    """Runs the pytest module ``path`` (relative to tests/) in a child process; fails with its output unless every
    test there passed (or was skipped), so a crash inside a kernel fails this test, not the whole run."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)},
    )
    if proc.returncode < 0:
        raise AssertionError(
            f"pytest on {path} died of {signal.Signals(-proc.returncode).name}:\n{proc.stdout[-6000:]}"
        )
    if proc.returncode not in (0, 5):  # 5: nothing collected (every case skipped at module level)
        raise AssertionError(
            f"pytest on {path} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
        )
