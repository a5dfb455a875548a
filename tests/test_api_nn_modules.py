"""Drop-in modules: parameter names, state_dict compatibility and the math they wrap."""

import math

import torch
import torch.nn.functional as F
from support.helpers import rel_l2

import flagdit_kernels as fk


def test_rms_norm_module_loads_a_lumina_state_dict():
    m = fk.nn.RMSNorm(24, eps=1e-6)
    w = torch.randn(24)
    m.load_state_dict({"weight": w}, strict=True)
    x = torch.randn(5, 24)
    assert rel_l2(m(x), F.rms_norm(x, (24,), w, 1e-6)) < 1e-6


def test_modulated_rms_norm_module():
    m = fk.nn.ModulatedRMSNorm(16)
    x, scale, shift = torch.randn(2, 3, 16), torch.randn(2, 16), torch.randn(2, 16)
    want = fk.reference.rms_norm(x, m.weight) * (1 + scale[:, None]) + shift[:, None]
    assert rel_l2(m(x, scale, shift), want) < 1e-6


def test_qk_norm_rope_module_uses_layer_norm_across_heads():
    m = fk.nn.QKNormRoPE(4, 2, 16)
    assert set(m.state_dict()) == {"q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias"}
    q, k = torch.randn(7, 4, 16), torch.randn(7, 2, 16)
    freqs = fk.rope_freqs(16, torch.arange(7))
    q_out, _ = m(q, k, freqs)
    normed = m.q_norm(q.flatten(1)).view(7, 4, 16)
    assert rel_l2(q_out, fk.apply_rope(normed, freqs)) < 1e-6


def test_gated_attention_has_lumina_parameter_names_and_zero_gate():
    m = fk.nn.GatedVarlenAttention(64, 4, 2, qk_norm=True, y_dim=32)
    names = set(m.state_dict())
    assert names == {
        "wq.weight", "wk.weight", "wv.weight", "wo.weight", "wk_y.weight", "wv_y.weight", "gate",
        "q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias", "ky_norm.weight", "ky_norm.bias",
    }  # fmt: skip
    assert torch.equal(m.gate, torch.zeros(4))


def test_gated_attention_matches_per_sequence_sdpa():
    torch.manual_seed(1)
    m = fk.nn.GatedVarlenAttention(64, 4, 4, qk_norm=True, y_dim=8).double()
    with torch.no_grad():
        m.gate.copy_(torch.randn(4))
    lens, text = [5, 3], [2, 4]
    x, y = torch.randn(8, 64, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    cu, tcu = torch.tensor([0, 5, 8], dtype=torch.int32), torch.tensor([0, 2, 6], dtype=torch.int32)
    freqs = fk.rope_freqs(16, torch.cat([torch.arange(n) for n in lens]))
    out = m(x, cu, 5, freqs, y, tcu, 4)
    start, tstart = 0, 0
    for n, t in zip(lens, text):
        xs, ys = x[start : start + n], y[tstart : tstart + t]
        q = fk.apply_rope(m.q_norm(m.wq(xs)).view(n, 4, 16), freqs[start : start + n]).transpose(0, 1)
        k = fk.apply_rope(m.k_norm(m.wk(xs)).view(n, 4, 16), freqs[start : start + n]).transpose(0, 1)
        v = m.wv(xs).view(n, 4, 16).transpose(0, 1)
        ky = m.ky_norm(m.wk_y(ys)).view(t, 4, 16).transpose(0, 1)
        vy = m.wv_y(ys).view(t, 4, 16).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(16))
        o = o + torch.tanh(m.gate)[:, None, None] * F.scaled_dot_product_attention(q, ky, vy)
        want = m.wo(o.transpose(0, 1).flatten(1))
        assert rel_l2(out[start : start + n], want) < 1e-10
        start, tstart = start + n, tstart + t
