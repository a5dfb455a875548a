"""One tiny forward + backward of every public op on every compiled or Triton backend that runs here, against
the float64 reference: the GPU check's first phase (a broken kernel shows in seconds, before minutes go into
timing it) and compute-sanitizer's workload (``benchmarks/gpu_check.sh --sanitize``).

The cases are declared by each op family beside its benchmark cases (``smoke_cases`` in
``flagdit_kernels/bench/families/<family>.py``), so every registered op with a kernel has one
(``tests/test_architecture_op_recipe.py`` checks it). On a GPU each case runs in bf16 and fp32; on the CPU
(Triton under ``TRITON_INTERPRET=1``, the C++ ops) in fp32. The attention cases cover what the kernels branch on
(``FLAGDIT_KERNELS_AUTOTUNE=compile`` runs every tile).
"""

from __future__ import annotations

import pytest
import torch
from support.helpers import DEVICE, ON_GPU, compare_with_reference, fresh

import flagdit_kernels as fk
from flagdit_kernels.bench.cases import all_smoke_cases

DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32]
SKIP = ("reference", "flash_attn")  # the spec itself; a third-party kernel with its own tests


# Declared by each op family beside its benchmark cases (flagdit_kernels/bench/families/<family>.py).
CASES = {case.name: case for case in all_smoke_cases(DEVICE)}
OPS = {name: case.op for name, case in CASES.items()}


def _params():
    for name, op in OPS.items():
        for backend in fk.available_backends(op, DEVICE):
            if backend not in SKIP:
                for dtype in DTYPES:
                    yield pytest.param(name, backend, dtype, id=f"{name}-{backend}-{str(dtype).split('.')[-1]}")


@pytest.mark.parametrize(("name", "backend", "dtype"), list(_params()))
def test_op_matches_reference(name, backend, dtype):
    case = CASES[name]
    inputs = {k: fresh(shape, dtype, scale=0.5 if k in ("gate", "scale") else 1.0) for k, shape in case.shapes.items()}
    family = "attention" if case.op == "varlen_attention" else "norm"
    mine, spec = (lambda **t: case.run(backend, **t)), (lambda **t: case.run("reference", **t))
    compare_with_reference(mine, spec, inputs, dtype, family=family)
