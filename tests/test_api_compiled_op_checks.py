"""Every compiled op (torch.ops.flagdit_kernels.*, C++ CPU and CUDA) checks its own arguments.

The public ops validate first, but the compiled ops are reachable directly, and autograd hands a backward
whatever a parameter has become by then (``w.data`` replaced between forward and backward). The cases run in a
subprocess (one per family and device, each case printing its outcome as it goes), so an op that crashes (a
division by zero, a read past a buffer) fails its test, naming the case, instead of ending the test run; each
case must raise a RuntimeError that says what is wrong.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from flagdit_kernels._extension import extension, extension_has_cuda

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(extension() is None, reason="the compiled extension is not built")

PRELUDE = """
import torch
import flagdit_kernels as fk
ops = torch.ops.flagdit_kernels
dev = "{device}"

def expect_error(fn, *words):
    try:
        out = fn()
    except RuntimeError as exc:
        text = str(exc)
        missing = [w for w in words if w not in text]
        print("raised" if not missing else f"message lacks {{missing}}: {{text}}", flush=True)
        return
    print("no error; returned", out, flush=True)
"""


def run_case(body: str, device: str = "cpu") -> str:
    """Runs ``body`` after the prelude in a fresh interpreter; returns its stdout, failing on a crash."""
    code = textwrap.dedent(PRELUDE.format(device=device)) + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (a crash?)\n{done.stdout}\n{done.stderr[-3000:]}"
    return done.stdout


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and extension_has_cuda() else [])

PACKING_CASES = {
    "unpack_zero_patch": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(20, 0, device=dev), [3, 1, 4, 4], 0, 3, True, True, "
        "True), 'patch_size')"
    ),
    "unpack_negative_patch": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(20, 12, device=dev), [3, 1, 4, 4], -2, 3, True, True, "
        "True), 'patch_size')"
    ),
    "unpack_side_not_multiple": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(12, 12, device=dev), [3, 1, 5, 4], 2, 3, True, True, "
        "True), 'multiples of patch_size')"
    ),
    "unpack_bad_ndim": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(12, 12, device=dev), [2, 1, 4, 4], 2, 3, True, True, "
        "True), 'ndim')"
    ),
    "unpack_3d_with_frames": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(12, 12, device=dev), [3, 2, 4, 4], 2, 3, True, True, "
        "True), 'F = 2')"
    ),
    "unpack_ragged_item_shapes": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(6, 12, device=dev), [3, 1, 4], 2, 3, True, True, True), "
        "'item_shapes')"
    ),
    "unpack_zero_channels": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(6, 0, device=dev), [3, 1, 4, 4], 2, 0, True, True, "
        "True), 'channels')"
    ),
    "unpack_int_tokens": (
        "expect_error(lambda: ops.unpack_patches(torch.ones(6, 12, dtype=torch.int32, device=dev), [3, 1, 4, 4], 2, "
        "3, True, True, True), 'floating')"
    ),
    "pack_zero_patch": (
        "expect_error(lambda: ops.pack_patches_layout([torch.randn(3, 4, 4, device=dev)], 0, True, True, False), "
        "'patch_size')"
    ),
    "pack_side_not_multiple": (
        "expect_error(lambda: ops.pack_patches_layout([torch.randn(3, 5, 4, device=dev)], 2, True, True, False), "
        "'multiples of patch_size')"
    ),
    "pack_zero_frames": (
        "expect_error(lambda: ops.pack_patches([torch.randn(3, 0, 4, 4, device=dev)], 2, True, True, False, 0), "
        "'F must be >= 1')"
    ),
    "pack_mixed_channels": (
        "expect_error(lambda: ops.pack_patches_layout([torch.randn(3, 4, 4, device=dev), torch.randn(2, 4, 4, "
        "device=dev)], 2, True, True, False), 'latents[1]')"
    ),
    "pack_wrong_total": (
        "expect_error(lambda: ops.pack_patches([torch.randn(3, 4, 4, device=dev)], 2, True, True, False, 99), "
        "'total_tokens')"
    ),
    "pack_zero_tile": (
        "expect_error(lambda: ops.pack_patches_layout([torch.randn(3, 4, 4, device=dev)], 2, True, True, False, "
        "[1, 0, 1]), 'tile')"
    ),
    "pack_short_tile": (
        "expect_error(lambda: ops.pack_patches([torch.randn(3, 4, 4, device=dev)], 2, True, True, False, 6, [2, 2]), "
        "'tile')"
    ),
    "unpack_negative_tile": (
        "expect_error(lambda: ops.unpack_patches(torch.randn(6, 12, device=dev), [3, 1, 4, 4], 2, 3, True, True, "
        "True, [1, -2, 1]), 'tile')"
    ),
}


def run_cases(cases: dict[str, str], setup: str, device: str) -> None:
    """All ``cases`` in one subprocess after ``setup``; every one must print "raised"."""
    body = textwrap.dedent(setup)
    for name, case in cases.items():
        body += f"print({name!r} + ': ', end='', flush=True)\n" + textwrap.dedent(case).strip() + "\n"
    lines = dict(line.split(": ", 1) for line in run_case(body, device).strip().splitlines())
    assert lines == dict.fromkeys(cases, "raised")


@pytest.mark.parametrize("device", DEVICES)
def test_packing_ops_reject_bad_arguments(device):
    run_cases(PACKING_CASES, "", device)


NORM_CASES = {
    "fwd_short_weight": "expect_error(lambda: fwd(x, torch.randn(71, device=dev), 1e-5), 'weight must have shape')",
    "fwd_long_weight": "expect_error(lambda: fwd(x, torch.randn(900, device=dev), 1e-5), 'weight must have shape')",
    "fwd_2d_weight": "expect_error(lambda: fwd(x, torch.randn(1, 72, device=dev), 1e-5), 'weight must have shape')",
    "fwd_int_x": "expect_error(lambda: fwd(x.long(), None, 1e-5), 'floating')",
    "fwd_nan_eps": "expect_error(lambda: fwd(x, None, float('nan')), 'eps')",
    "fwd_empty_rows": "expect_error(lambda: fwd(x[:, :0], None, 1e-5), 'D')",
    "bwd_short_rstd": "expect_error(lambda: bwd(x, x, w, rstd[:-1]), 'rstd must have shape')",
    "bwd_2d_rstd": "expect_error(lambda: bwd(x, x, w, rstd[None]), 'rstd must have shape')",
    "bwd_short_weight": "expect_error(lambda: bwd(x, x, w[:70], rstd), 'weight must have shape')",
    "bwd_dy_shape": "expect_error(lambda: bwd(x[:-1], x, w, rstd), 'dy must have')",
    # The reproduction: the public op's backward after the weight was swapped for a shorter one.
    "autograd_weight_swapped": """
        wp = torch.randn(72, device=dev, requires_grad=True)
        xp = torch.randn(9, 72, device=dev, requires_grad=True)
        y = fk.rms_norm(xp, wp, backend=backend)
        wp.data = torch.randn(70, device=dev)
        expect_error(lambda: y.sum().backward(), 'weight must have shape')
    """,
}


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_ops_reject_bad_arguments(device):
    setup = """
        backend = dev
        fwd, bwd = ops.rms_norm_fwd, ops.rms_norm_bwd  # one op each, its CPU or CUDA kernel by x's device
        x = torch.randn(9, 72, device=dev)
        w = torch.randn(72, device=dev)
        _, rstd = fwd(x, w, 1e-5)
    """
    run_cases(NORM_CASES, setup, device)


def test_valid_calls_still_work():
    """The checks accept what the public ops pass: 3-D and 4-D latents, fp32 weights with half inputs."""
    out = run_case(
        """
        x = torch.randn(2, 5, 72).to(torch.bfloat16)
        y, rstd = ops.rms_norm_fwd(x, torch.randn(72), 1e-5)
        dx, dw = ops.rms_norm_bwd(torch.randn_like(x), x, torch.randn(72), rstd)
        packed = ops.pack_patches_layout([torch.randn(3, 4, 6), torch.randn(3, 2, 4, 4)], 2, True, True, False)
        outs = ops.unpack_patches(packed[0], [3, 1, 4, 6, 4, 2, 4, 4], 2, 3, True, True, False)
        print(tuple(y.shape), tuple(dw.shape), [tuple(o.shape) for o in outs])
        """
    )
    assert out.strip() == "(2, 5, 72) (72,) [(3, 4, 6), (3, 2, 4, 4)]"
