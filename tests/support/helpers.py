"""Shared test harness: kernel-vs-reference comparisons on fresh random data with poisoned allocations.

Usage in a kernel test::

    inputs = make_inputs({"x": (65, 72), "weight": (72,)}, dtype)
    compare_with_reference(lambda x, weight: fk.rms_norm(x, weight, backend="triton"),
                           lambda x, weight: ref.rms_norm(x, weight), inputs, dtype, family="norm")

The reference runs on float64 copies of the same inputs; outputs and every input gradient (for a random
upstream gradient) are compared by relative L2 error against DESIGN.md's tolerances.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import Callable, Iterator

import pytest
import torch

import flagdit_kernels as fk
from flagdit_kernels import _dispatch

DEVICE = torch.device(os.environ.get("FLAGDIT_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
ON_GPU = DEVICE.type == "cuda"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Triton kernels run here: compiled on a GPU, or as NumPy under the interpreter.
TRITON_RUNS = TRITON_INSTALLED and (ON_GPU or INTERPRETED)
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton on a GPU, or TRITON_INTERPRET=1 on CPU")
# The Triton interpreter gets tl.dot on bf16 wrong (triton-lang/triton#11584): bf16 dots are GPU-only.
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DOT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# rel-L2 tolerances against a float64 reference (DESIGN.md, Numerics).
TOLERANCE = {
    "norm": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10},
    "attention": {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10},
}


def offsets_of(lengths: list[int], device: torch.device | str = DEVICE) -> torch.Tensor:
    """The int32 offsets ``[0, l0, l0 + l1, ...]`` of a packed batch of sequences of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)  # fmt: skip


def backend_params(op: str, *, reference: bool = True) -> list:
    """Every backend ``op`` registers (without ``reference`` when it is the spec the test compares with), each a
    pytest parameter that is skipped, with the reason, where it cannot run on DEVICE: a test lists them all, so a
    backend that stops running here shows as a skip instead of vanishing."""
    runnable = fk.available_backends(op, DEVICE)
    out = []
    # The registry's full list is not public API: the public fk.available_backends only names what runs here.
    for name in _dispatch.registered_backends(op):
        if name == "reference" and not reference:
            continue
        if name in runnable:
            out.append(name)
            continue
        why = {
            "triton": "triton runs here only on a GPU or under TRITON_INTERPRET=1",
            "cpu": "the compiled extension is not loaded",
            "cuda": "needs a GPU and the CUDA build of the compiled extension",
        }.get(name, f"not available on {DEVICE.type}")
        out.append(pytest.param(name, marks=pytest.mark.skip(reason=f"{op}/{name}: {why}")))
    return out


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    err = (actual - expected).norm().item()
    return err / denom if denom > 0 else err


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "output") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an unwritten, poisoned element?)"
    err = rel_l2(actual, expected)
    assert err < tol, f"{what}: rel-L2 {err:.3e} >= {tol:.1e}"


def fresh(shape, dtype: torch.dtype, device=DEVICE, *, scale: float = 1.0, offset: float = 0.0, seed=None):
    """Random normal data (never zeros/ones), drawn from a generator seeded per call site when given."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype).to(device)


def make_inputs(shapes: dict[str, tuple[int, ...] | None], dtype: torch.dtype, **overrides) -> dict:
    """Fresh random tensors by name; ``None`` entries stay None; ``overrides`` are passed through as given."""
    out = {name: None if shape is None else fresh(shape, dtype) for name, shape in shapes.items()}
    out.update(overrides)
    return out


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Fills every uninitialized allocation (torch.empty and friends) with NaN while active."""
    import torch.utils.deterministic as det

    old_fill, old_mode = det.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    det.fill_uninitialized_memory = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        det.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_mode, warn_only=old_warn)


def _as_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def compare_with_reference(
    fn: Callable,
    ref_fn: Callable,
    inputs: dict,
    dtype: torch.dtype,
    *,
    family: str = "norm",
    grad: bool = True,
    tol: float | None = None,
    grad_tol: float | None = None,
) -> None:
    """Runs ``fn(**inputs)`` under poisoned allocations and ``ref_fn`` on float64 copies; compares outputs and
    the gradients of every floating input (for a random upstream gradient) by rel-L2."""
    tol = tol if tol is not None else TOLERANCE[family][dtype]
    grad_tol = grad_tol if grad_tol is not None else tol
    differentiable = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    mine = {
        k: (v.detach().clone().requires_grad_(grad and k in differentiable) if k in differentiable else v)
        for k, v in inputs.items()
    }
    ref_in = {k: (v.detach().double().requires_grad_(grad) if k in differentiable else v) for k, v in inputs.items()}
    with poisoned_allocations():
        outs = _as_outputs(fn(**mine))
    ref_outs = _as_outputs(ref_fn(**ref_in))
    assert len(outs) == len(ref_outs)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == inputs[differentiable[0]].dtype or o.dtype == dtype, f"output {i} dtype {o.dtype}"
        assert_rel_close(o, r, tol, f"output {i}")
    if not grad:
        return
    upstream = [fresh(o.shape, torch.float64, o.device) for o in outs]
    with poisoned_allocations():
        torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    torch.autograd.backward(ref_outs, upstream)
    for k in differentiable:
        r = ref_in[k].grad
        g = mine[k].grad
        if r is None:
            continue
        assert g is not None, f"no gradient for {k}"
        assert_rel_close(g, r, grad_tol, f"grad {k}")


def force_warp_specialized(monkeypatch) -> None:
    """Makes the Triton varlen attention run only its warp-specialized tiles (forward, dk/dv and dq kernels;
    descriptor loads; the WS loop shapes), untuned. On the CPU (the interpreter ignores warp_specialize itself)
    descriptors and the split are declared ready; on a GPU the caller skips anything but sm_90."""
    from flagdit_kernels.triton.attention import autotune as tuning
    from flagdit_kernels.triton.attention import launch as va

    if not ON_GPU:
        monkeypatch.setattr(va, "_descriptor_ready", lambda *tensors: True)
        monkeypatch.setattr(va, "_warp_specialize_ready", lambda *tensors: True)
        monkeypatch.setattr(va, "BWD_WS_TRITONS", (tuning.TRITON_VERSION,))
    block = 32 if INTERPRETED else 128
    forward_tiles = [tuning.Tile(block, block // 2 if ON_GPU else 32, 4, 2, tma=True, ws=True)]
    monkeypatch.setattr(va.FORWARD, "tiles", forward_tiles)
    monkeypatch.setattr(va.SPARSE_FORWARD, "tiles", forward_tiles)  # the tile-sparse descriptor loops
    monkeypatch.setattr(va.DKDV, "tiles", [tuning.Tile(32 if INTERPRETED else 64, block, 4, 2, tma=True, ws=True)])
    monkeypatch.setattr(va.DQ, "tiles", [tuning.Tile(block, 32 if INTERPRETED else 64, 4, 2, tma=True, ws=True)])
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "0")
