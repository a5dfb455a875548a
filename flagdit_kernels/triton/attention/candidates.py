"""Kernels offered beside a tuned Triton kernel (the Gluon forward) that must prove themselves on the GPU first.

Gluon kernels never run under the interpreter, so no CPU test has run them: the first time a regime is tuned,
each candidate runs on the same inputs as the Triton kernel (its tuned tile), its outputs poisoned (NaN)
beforehand, and is compared output by output (rel-L2 against the Triton result, at the reference tests'
tolerance: DESIGN.md, Numerics). A candidate that disagrees, writes a non-finite value where Triton did not, or
fails to compile is dropped for that regime with one warning naming it; the others are timed against the Triton
kernel and the fastest of all wins. The result, rejections included, is a tuning-cache file beside the tile
choice (autotune.py), under the same rules: trusted only if it parses, names exactly this key and
names a choice among those offered now; an unwritable directory keeps it in memory.

Candidates are offered only in autotune mode ``1``, only on sm_90 devices, and only with
FLAGDIT_KERNELS_GLUON=1: nothing Gluon is a default until a GPU run has recorded a pass
(benchmarks/gpu_check.sh, benchmarks/RESULTS.md). A kernel that agrees yet hangs cannot be caught here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import torch

from . import autotune as tuning

CHOICE_VERSION = 1
TRITON = "triton"  # the choice that keeps the tuned Triton kernel
# rel-L2 a candidate may differ from the Triton kernel by: the reference tests' tolerance (DESIGN.md).
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def enabled() -> bool:
    """FLAGDIT_KERNELS_GLUON=1 opts in (read at each call, so a test or gpu_check.sh may set it)."""
    return os.environ.get("FLAGDIT_KERNELS_GLUON", "0") == "1"


def on_sm90(regime: dict) -> bool:
    """Whether a tuning regime (autotune.device_fields) is an sm_90 device."""
    return list(regime.get("capability", ())) == [9, 0]


def disagreement(actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float) -> str | None:
    """Why ``actual`` does not match ``expected`` (rel-L2 over each pair, non-finite values where the expected
    is finite), or None when every pair is within ``tol``."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        a, e = a.double(), e.double()
        finite = torch.isfinite(e)
        if not torch.isfinite(a[finite]).all():
            return f"output {i}: non-finite values where the Triton kernel's are finite"
        err = ((a[finite] - e[finite]).norm() / e[finite].norm().clamp_min(1e-30)).item()
        if not err < tol:
            return f"output {i}: rel-L2 {err:.2e} >= {tol:.0e}"
    return None


_chosen: dict[str, str] = {}  # key -> choice, this process


def _path(key: str) -> str:
    return os.path.join(tuning.cache_dir(), f"candidates-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")


def _read(path: str, key: str, offered: list[str]) -> str | None:
    def offered_choice(data: dict) -> str | None:
        return data["choice"] if data["choice"] in (TRITON, *offered) else None

    return tuning.read_cache(path, key, CHOICE_VERSION, offered_choice, "candidate")


def _write(path: str, data: dict) -> None:
    tuning.write_cache(path, data, "candidate")


def choose(
    key: str,
    reference: Callable[[], None],
    candidates: dict[str, Callable[[], None]],
    outputs: list[torch.Tensor],
    tol: float,
) -> str:
    """The kernel to run for tuning key ``key``: ``TRITON`` or the name of one of ``candidates``. Every callable
    launches one kernel writing ``outputs``; ``reference`` is the tuned Triton kernel. After the call the outputs
    hold the result of whatever ran last (callers run the choice again)."""
    if key in _chosen and _chosen[key] in (TRITON, *candidates):
        return _chosen[key]
    path = _path(key)
    choice = _read(path, key, list(candidates))
    if choice is None:
        choice = _tune(key, path, reference, candidates, outputs, tol)
    _chosen[key] = choice
    return choice


def _tune(key, path, reference, candidates, outputs, tol) -> str:
    reference()
    expected = [t.clone() for t in outputs]
    timings = {TRITON: tuning.measure(reference)}
    rejected = {}
    for name, run in candidates.items():
        for t in outputs:
            t.fill_(float("nan") if t.is_floating_point() else -1)
        try:
            run()
            reason = disagreement(outputs, expected, tol)
        except Exception as exc:  # a candidate that cannot compile or launch here is dropped (a CUDA fault is not)
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            rejected[name] = reason
            tuning._warn_once(f"{key}/{name}", f"dropping the kernel {name} for this regime: it disagrees with the "
                                               f"Triton kernel ({reason})")  # fmt: skip
            continue
        timings[name] = tuning.measure(run)
    choice = min(timings, key=timings.get)
    _write(path, {"version": CHOICE_VERSION, "key": key, "choice": choice, "timings_ms": timings, "rejected": rejected})
    return choice


def gluon_forward(tuned, grid, args: tuple, consts: dict, regime: dict, offered: list, reset: Callable) -> bool:
    """The forward's hook (``TunedKernel.alternatives``): runs the Gluon forward instead of the Triton one and
    returns True when it is offered here and was chosen for this regime; False leaves the launch to Triton."""
    if not (enabled() and on_sm90(regime)):
        return False
    from . import gluon_fwd  # imports Gluon only where it may run

    return gluon_fwd.offer(tuned, grid, args, consts, regime, offered, reset)
