"""Bad input to the RMSNorm family gets a clear error naming the argument."""

import pytest
import torch

import flagdit_kernels as fk

X = torch.randn(6, 16)
W = torch.randn(16)
CU = torch.tensor([0, 2, 6], dtype=torch.int32)
PER_SAMPLE = torch.randn(2, 16)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fk.rms_norm(X.tolist(), W), TypeError, "x must be a torch.Tensor"),
        (lambda: fk.rms_norm(X, torch.randn(15)), ValueError, r"weight must have shape \(16,\)"),
        (lambda: fk.rms_norm(X.int(), None), TypeError, "x must have dtype in"),
        (lambda: fk.rms_norm(X, W, eps=-1.0), ValueError, "eps must be a finite number >= 0"),
        (lambda: fk.rms_norm(torch.randn(3, 0), None), ValueError, "non-empty last"),
        (lambda: fk.rms_norm(X, W.to("meta")), ValueError, "weight is on meta"),
        (lambda: fk.rms_norm_modulate(X, W, PER_SAMPLE, cu_seqlens=CU.long()), TypeError, "cu_seqlens must have dtype"),
        (lambda: fk.rms_norm_modulate(X, W, PER_SAMPLE, cu_seqlens=CU + 1), ValueError, "cu_seqlens must start at 0"),
        (
            lambda: fk.rms_norm_modulate(
                X, W, torch.randn(3, 16), cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32)
            ),
            ValueError,
            "cu_seqlens must be non-decreasing",
        ),
        (
            lambda: fk.rms_norm_modulate(X, W, PER_SAMPLE, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)),
            ValueError,
            r"cu_seqlens\[-1\] must equal x.shape\[0\] \(6\)",
        ),
        (
            lambda: fk.rms_norm_modulate(X, W, torch.randn(3, 16), cu_seqlens=CU),
            ValueError,
            r"scale must have shape \(2, 16\)",
        ),
        (
            lambda: fk.rms_norm_modulate(X, W, PER_SAMPLE, torch.randn(2, 15), cu_seqlens=CU),
            ValueError,
            "shift must have shape",
        ),
        (lambda: fk.rms_norm_modulate(X[None], W, PER_SAMPLE, cu_seqlens=CU), ValueError, r"x must be packed \(T, D\)"),
        (
            lambda: fk.rms_norm_modulate(torch.randn(3, 4, 16), W, PER_SAMPLE),
            ValueError,
            r"scale must have shape \(3, 16\)",
        ),
        (lambda: fk.rms_norm_modulate(X, W, torch.randn(5, 16)), ValueError, "does not broadcast"),
        (
            lambda: fk.gated_residual_rms_norm(X[:5], X, W, PER_SAMPLE, cu_seqlens=CU),
            ValueError,
            "residual must have shape",
        ),
        (
            lambda: fk.gated_residual_rms_norm(X, X, W, torch.randn(2, 8), cu_seqlens=CU),
            ValueError,
            "gate must have shape",
        ),
        (lambda: fk.proportional_scale(0, 1024, 64), ValueError, "seqlen must be a positive int"),
        (lambda: fk.proportional_scale(4096, 1, 64), ValueError, "base_seqlen must be an int >= 2"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_proportional_scale_is_lumina_formula():
    import math

    assert fk.proportional_scale(4096, 1024, 64) == pytest.approx(math.sqrt(math.log(4096, 1024) / 64))
    assert fk.proportional_scale(1024, 1024, 128) == pytest.approx(1 / math.sqrt(128))
