"""The packed RMSNorm family takes any number of samples in one pack (issue 25, item 4): past 1024 samples (where
the backward's old sample-range search built a B x B matrix) and past 65536 (the forward's register table of
sequence ends), forward and every gradient against the float64 reference. Samples are short (empty ones
included) and D small, so the interpreted kernels stay quick; tests/test_rms_norm_compile.py checks that the
compiled kernels do not depend on the sample count."""

from __future__ import annotations

import pytest
import torch
from support.helpers import DEVICE, compare_with_reference, make_inputs

import flagdit_kernels as fk
from flagdit_kernels import reference as ref

D = 8


def _lengths(n: int, tokens: int, seed: int) -> list[int]:
    """``n`` sample lengths adding up to ``tokens``: every sample 0 to 3 tokens long, many empty."""
    gen = torch.Generator().manual_seed(seed)
    owners = torch.randint(0, n, (tokens,), generator=gen)
    lengths = torch.bincount(owners, minlength=n).clamp(max=3)
    return lengths.tolist()


@pytest.mark.parametrize("op", ["rms_norm_modulate", "gated_residual_rms_norm"])
@pytest.mark.parametrize(("samples", "tokens"), [(1500, 700), (70000, 180)], ids=["1500", "70000"])
def test_many_samples_in_one_pack(op, samples, tokens):
    if "triton" not in fk.available_backends(op, DEVICE):
        pytest.skip("triton cannot run here")
    lengths = _lengths(samples, tokens, seed=samples)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    t = int(cu[-1])
    inputs = make_inputs({"x": (t, D), "weight": (D,), "p": (samples, D), "q": (samples, D), "res": (t, D)},
                         torch.float32)  # fmt: skip
    if op == "rms_norm_modulate":
        kernel = lambda x, weight, p, q, res: fk.rms_norm_modulate(x, weight, p, q, 1e-5, cu, backend="triton")
        want = lambda x, weight, p, q, res: ref.rms_norm_modulate(x, weight, p, q, 1e-5, cu)
    else:
        kernel = lambda x, weight, p, q, res: fk.gated_residual_rms_norm(res, x, weight, p, 1e-5, True, cu,
                                                                         backend="triton")  # fmt: skip
        want = lambda x, weight, p, q, res: ref.gated_residual_rms_norm(res, x, weight, p, 1e-5, True, cu)
    compare_with_reference(kernel, want, inputs, torch.float32)
