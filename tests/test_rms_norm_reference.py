"""The RMSNorm family reference against independent formulations, and gradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F
from support.helpers import rel_l2

from flagdit_kernels import reference as ref


def test_rms_norm_matches_functional_rms_norm_in_float64():
    x, w = torch.randn(7, 72, dtype=torch.float64), torch.randn(72, dtype=torch.float64)
    assert rel_l2(ref.rms_norm(x, w, 1e-6), F.rms_norm(x, (72,), w, 1e-6)) < 1e-12


def test_rms_norm_rounds_like_lumina_before_the_weight():
    x, w = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    lumina = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x) * w
    assert torch.equal(ref.rms_norm(x, w), lumina)


def test_modulate_and_gate_broadcast_per_sample_in_both_layouts():
    b, lens, d = 3, [4, 1, 6], 40
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)
    x = torch.randn(sum(lens), d, dtype=torch.float64)
    w, scale, shift, gate = (torch.randn(n, dtype=torch.float64) for n in ((d,), (b, d), (b, d), (b, d)))
    packed = ref.rms_norm_modulate(x, w, scale, shift, cu_seqlens=cu)
    gated = ref.gated_residual_rms_norm(x, x.flip(0), w, gate, cu_seqlens=cu)
    start = 0
    for i, n in enumerate(lens):
        rows = slice(start, start + n)
        normed = F.rms_norm(x[rows], (d,), w, 1e-5)
        assert rel_l2(packed[rows], normed * (1 + scale[i]) + shift[i]) < 1e-12
        normed_h = F.rms_norm(x.flip(0)[rows], (d,), w, 1e-5)
        assert rel_l2(gated[rows], x[rows] + torch.tanh(gate[i]) * normed_h) < 1e-12
        start += n
    padded = torch.randn(b, 6, d, dtype=torch.float64)
    out = ref.rms_norm_modulate(padded, w, scale, None)
    assert rel_l2(out, F.rms_norm(padded, (d,), w, 1e-5) * (1 + scale[:, None])) < 1e-12


@pytest.mark.parametrize("tanh_gate", [True, False])
def test_gradcheck_float64(tanh_gate):
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((5, 12), (5, 12), (12,), (2, 12))]
    assert torch.autograd.gradcheck(
        lambda r, h, w, g: ref.gated_residual_rms_norm(r, h, w, g, 1e-5, tanh_gate, cu), args
    )
    x, w, scale, shift = args[0], args[2], args[3], args[1][:2].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: ref.rms_norm_modulate(*a, cu_seqlens=cu), (x, w, scale, shift))
    assert torch.autograd.gradcheck(ref.rms_norm, (x, w))
