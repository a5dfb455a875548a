"""The rotary reference (``rope_freqs``, ``apply_rope``, ``qk_norm_rope``) against independent formulations
written the way the Lumina codebases write them, plus input validation of the public ops.

- Lumina-T2X (Flag-DiT): 1D ``freqs_cis`` over the flattened token sequence, complex multiplication.
- Lumina-Next: a (rows, cols) table whose rotary pairs alternate row / col frequencies.
- Lumina-Image-2.0: one fp64-built table per axis, gathered by position ids and concatenated.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flagdit_kernels as fk
from flagdit_kernels import reference as ref

FP32_EPS = 2.0**-24


def as_complex(freqs: torch.Tensor) -> torch.Tensor:
    """Our (..., Dh/2, 2) (cos, sin) table as complex numbers."""
    return torch.complex(freqs[..., 0].double(), freqs[..., 1].double())


def table_atol(max_angle: float) -> float:
    """Two fp32 ways of computing the same angle may differ by a few ulps of the angle; cos/sin inherit it."""
    return 8 * max(max_angle, 1.0) * FP32_EPS


# ---- Lumina-style formulations (written for these tests from the conventions, not copied) ------------------


def lumina_t2x_freqs_cis(dim, end, theta=10000.0, linear_factor=1.0, ntk_factor=1.0):
    """1D: frequencies theta'^(-2i/dim) divided by the linear factor, angles t * f in fp32, complex64."""
    theta = theta * ntk_factor
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)) / linear_factor
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs).float()
    return torch.polar(torch.ones_like(angles), angles)


def lumina_next_freqs_cis(dim, end, theta=10000.0, linear_factor=1.0, ntk_factor=1.0):
    """2D: one dim/4 frequency set theta'^(-4j/dim); pair 2j rotates by the row, pair 2j+1 by the column.
    Returns (end, end, dim/2) complex64 for (row, col)."""
    theta = theta * ntk_factor
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: dim // 4].float() / dim)) / linear_factor
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs).float()
    cis = torch.polar(torch.ones_like(angles), angles)
    rows = cis.view(end, 1, dim // 4, 1).expand(end, end, dim // 4, 1)
    cols = cis.view(1, end, dim // 4, 1).expand(end, end, dim // 4, 1)
    return torch.cat([rows, cols], dim=-1).flatten(2)


def lumina_image2_freqs_cis(ids, axes_dims, axes_lens, theta=256.0):
    """Per axis: a table built in fp64 (angles rounded to fp32, complex64), gathered by that axis' id;
    the per-axis pair groups are concatenated in axis order."""
    parts = []
    for a, (d, e) in enumerate(zip(axes_dims, axes_lens)):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.outer(torch.arange(e, dtype=torch.float64), freqs).float()
        table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
        parts.append(table[ids[:, a].long()])
    return torch.cat(parts, dim=-1)


def lumina_complex_rope(x, freqs_cis):
    """Lumina's apply_rotary_emb: adjacent pairs as complex numbers times freqs_cis, broadcast over heads."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs_cis.unsqueeze(-2)).flatten(-2)


def hf_rotate_half_rope(x, cos_half, sin_half):
    """Llama/HF: x * cos + rotate_half(x) * sin with the half tables repeated over both halves."""
    cos = torch.cat([cos_half, cos_half], dim=-1).unsqueeze(-2)
    sin = torch.cat([sin_half, sin_half], dim=-1).unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ---- tables ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [32, 72, 128])
def test_1d_table_matches_lumina_t2x(head_dim):
    n = 300  # the flattened sequence incl. [nextline] tokens: positions are just 0..T-1
    ours = fk.rope_freqs(head_dim, torch.arange(n))
    assert ours.dtype == torch.float32 and ours.shape == (n, head_dim // 2, 2)
    theirs = lumina_t2x_freqs_cis(head_dim, n)
    # Same fp32 frequencies and products: equal up to the cos/sin implementation.
    torch.testing.assert_close(as_complex(ours), theirs.to(torch.complex128), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("linear", "ntk"), [(2.0, 1.0), (1.0, 4.0), (1.5, 3.0)])
def test_1d_scaling_matches_lumina_t2x(linear, ntk):
    n, dim = 200, 64
    ours = fk.rope_freqs(dim, torch.arange(n, dtype=torch.int32), linear_factor=linear, ntk_factor=ntk)
    theirs = lumina_t2x_freqs_cis(dim, n, linear_factor=linear, ntk_factor=ntk)
    # Lumina divides the frequencies by the linear factor, we divide the positions: same angle, other rounding.
    torch.testing.assert_close(as_complex(ours), theirs.to(torch.complex128), atol=table_atol(n), rtol=0)
    # And scaling really changes the table (guards against an ignored argument).
    plain = fk.rope_freqs(dim, torch.arange(n))
    assert (ours - plain).abs().max() > 0.1


@pytest.mark.parametrize("head_dim", [32, 72, 128])
@pytest.mark.parametrize(("linear", "ntk"), [(1.0, 1.0), (2.0, 1.0), (1.0, 3.0)])
def test_2d_alternating_matches_lumina_next(head_dim, linear, ntk):
    rows, cols, end = 5, 7, 9
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    positions = grid.reshape(-1, 2)  # row-major patch order, (row, col)
    ours = fk.rope_freqs(head_dim, positions, linear_factor=linear, ntk_factor=ntk)
    table = lumina_next_freqs_cis(head_dim, end, linear_factor=linear, ntk_factor=ntk)
    theirs = table[:rows, :cols].flatten(0, 1)  # how Lumina-Next slices the table for one image
    torch.testing.assert_close(as_complex(ours), theirs.to(torch.complex128), atol=table_atol(end), rtol=0)


def test_2d_pairs_alternate_axes():
    """Pair k follows axis k % 2 with frequency index k // 2: moving along columns leaves even pairs alone."""
    dim = 16
    a = fk.rope_freqs(dim, torch.tensor([[3, 4]]))
    b = fk.rope_freqs(dim, torch.tensor([[3, 9]]))
    assert torch.equal(a[:, 0::2], b[:, 0::2])
    assert not torch.allclose(a[:, 1::2], b[:, 1::2])
    # Pairs 2j (row) and 2j+1 (col) share frequency j: equal when row == col.
    c = fk.rope_freqs(dim, torch.tensor([[6, 6]]))
    assert torch.equal(c[:, 0::2], c[:, 1::2])


@pytest.mark.parametrize(("axes_dims", "theta"), [((16, 56, 56), 256.0), ((32, 48, 48), 256.0), ((8, 12, 12), 10000.0)])
def test_per_axis_matches_lumina_image2(axes_dims, theta):
    axes_lens = (6, 40, 40)
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, e, (50,), generator=gen) for e in axes_lens], dim=-1).to(torch.int32)
    head_dim = sum(axes_dims)
    ours = fk.rope_freqs(head_dim, ids, axes_dims=axes_dims, theta=theta)
    theirs = lumina_image2_freqs_cis(ids, axes_dims, axes_lens, theta)
    # We take cos/sin of the fp64 angle; Lumina-Image-2.0 rounds the angle to fp32 first.
    torch.testing.assert_close(as_complex(ours), theirs.to(torch.complex128), atol=table_atol(40), rtol=0)


def test_per_axis_groups_are_consecutive():
    axes_dims = (4, 8, 4)
    ids = torch.tensor([[1, 2, 3], [1, 5, 3]])
    out = fk.rope_freqs(16, ids, axes_dims=axes_dims)
    # Only axis 1 differs: only its group (pairs 2..5) changes.
    assert torch.equal(out[0, :2], out[1, :2]) and torch.equal(out[0, 6:], out[1, 6:])
    assert not torch.allclose(out[0, 2:6], out[1, 2:6])


def test_per_axis_with_packed_positions():
    """fk.pack's (frame, row, col) positions drive a 3-axis table directly, placeholders included."""
    packed = fk.pack([torch.randn(4, 4, 6), torch.randn(4, 2, 4, 4)], patch_size=2)
    freqs = fk.rope_freqs(32, packed.positions, axes_dims=(8, 12, 12))
    assert freqs.shape == (packed.positions.shape[0], 16, 2)
    assert torch.isfinite(freqs).all()
    torch.testing.assert_close(freqs[..., 0] ** 2 + freqs[..., 1] ** 2, torch.ones(freqs.shape[:-1]))


def test_positions_t1_column_is_1d():
    pos = torch.arange(11)
    torch.testing.assert_close(fk.rope_freqs(24, pos[:, None]), fk.rope_freqs(24, pos), atol=0, rtol=0)


def test_float_positions():
    pos = torch.arange(9, dtype=torch.float32) * 0.5
    out = fk.rope_freqs(16, pos)
    expected = lumina_t2x_freqs_cis(16, 9)  # integer positions, linear factor 2 halves them
    torch.testing.assert_close(as_complex(out), as_complex(fk.rope_freqs(16, torch.arange(9), linear_factor=2.0)))
    assert not torch.allclose(as_complex(out), expected.to(torch.complex128))


# ---- rotation and QK-norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 3, 48), (1, 1, 32), (2, 5, 4, 72)])
def test_interleaved_rotation_is_lumina_complex_multiply(shape):
    x = torch.randn(shape, dtype=torch.float64)
    n = shape[-3]
    freqs = fk.rope_freqs(shape[-1], torch.arange(n) * 3)
    ours = ref.apply_rope(x, freqs, interleaved=True)
    theirs = lumina_complex_rope(x, as_complex(freqs))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(7, 3, 48), (2, 5, 4, 72)])
def test_rotate_half_is_hf_convention(shape):
    x = torch.randn(shape, dtype=torch.float64)
    freqs = fk.rope_freqs(shape[-1], torch.arange(shape[-3]) + 11)
    ours = ref.apply_rope(x, freqs, interleaved=False)
    theirs = hf_rotate_half_rope(x, freqs[..., 0].double(), freqs[..., 1].double())
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_batched_freqs_per_sample():
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    f = torch.stack([fk.rope_freqs(16, torch.arange(5)), fk.rope_freqs(16, torch.arange(5) + 7)])
    out = ref.apply_rope(x, f)
    for b in range(2):
        torch.testing.assert_close(out[b], lumina_complex_rope(x[b], as_complex(f[b])))


def test_rotation_preserves_pair_norms_and_inverts():
    x = torch.randn(9, 2, 40, dtype=torch.float64)
    f = fk.rope_freqs(40, torch.arange(9))
    y = ref.apply_rope(x, f)
    torch.testing.assert_close(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    back = f.clone()
    back[..., 1] = -back[..., 1]
    torch.testing.assert_close(ref.apply_rope(y, back), x)


def test_low_precision_input_rotates_in_fp32():
    x = torch.randn(6, 2, 32).to(torch.bfloat16)
    f = fk.rope_freqs(32, torch.arange(6) * 50)
    out = ref.apply_rope(x, f)
    assert out.dtype == torch.bfloat16
    exact = lumina_complex_rope(x.float(), as_complex(f).to(torch.complex64)).to(torch.bfloat16)
    torch.testing.assert_close(out, exact, atol=0, rtol=0)


def test_qk_layer_norm_across_heads_matches_lumina_chain():
    t, h, hkv, dh = 6, 4, 2, 24
    q, k = torch.randn(t, h, dh, dtype=torch.float64), torch.randn(t, hkv, dh, dtype=torch.float64)
    qw, qb = torch.randn(h * dh, dtype=torch.float64), torch.randn(h * dh, dtype=torch.float64)
    kw, kb = torch.randn(hkv * dh, dtype=torch.float64), torch.randn(hkv * dh, dtype=torch.float64)
    f = fk.rope_freqs(dh, torch.arange(t))
    ours = ref.qk_norm_rope(q, k, f, (qw, qb), (kw, kb), "layer_norm", 1e-6)
    cis = as_complex(f)
    q_ln = F.layer_norm(q.flatten(1), (h * dh,), qw, qb, 1e-6).view_as(q)
    k_ln = F.layer_norm(k.flatten(1), (hkv * dh,), kw, kb, 1e-6).view_as(k)
    torch.testing.assert_close(ours[0], lumina_complex_rope(q_ln, cis))
    torch.testing.assert_close(ours[1], lumina_complex_rope(k_ln, cis))


def test_qk_rms_norm_per_head_matches_lumina_image2_chain():
    t, h, dh = 5, 3, 32
    q, k = torch.randn(t, h, dh, dtype=torch.float64), torch.randn(t, h, dh, dtype=torch.float64)
    qw, kw = torch.randn(dh, dtype=torch.float64), torch.randn(dh, dtype=torch.float64)
    ids = torch.stack([torch.zeros(t), torch.arange(t), torch.arange(t) % 2], dim=-1).int()
    f = fk.rope_freqs(dh, ids, axes_dims=(8, 12, 12), theta=256.0)

    def rms(x, w, eps=1e-5):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    ours = ref.qk_norm_rope(q, k, f, (qw, None), (kw, None), "rms_norm", 1e-5)
    torch.testing.assert_close(ours[0], lumina_complex_rope(rms(q, qw), as_complex(f)))
    torch.testing.assert_close(ours[1], lumina_complex_rope(rms(k, kw), as_complex(f)))


def test_qk_no_norm_is_plain_rope():
    q, k = torch.randn(4, 2, 16, dtype=torch.float64), torch.randn(4, 1, 16, dtype=torch.float64)
    f = fk.rope_freqs(16, torch.arange(4))
    qo, ko = fk.qk_norm_rope(q, k, f, norm=None, backend="reference")
    torch.testing.assert_close(qo, ref.apply_rope(q, f))
    torch.testing.assert_close(ko, ref.apply_rope(k, f))


def test_qk_norm_modules_and_eps():
    t, h, dh = 3, 2, 16
    q, k = torch.randn(t, h, dh, dtype=torch.float64), torch.randn(t, h, dh, dtype=torch.float64)
    f = fk.rope_freqs(dh, torch.arange(t))
    qn = torch.nn.LayerNorm(h * dh, eps=1e-2).double()
    kn = torch.nn.LayerNorm(h * dh, eps=1e-2).double()
    with torch.no_grad():
        for p in (*qn.parameters(), *kn.parameters()):
            p.normal_()
    qo, _ = fk.qk_norm_rope(q, k, f, qn, kn, backend="reference")
    expected = lumina_complex_rope(qn(q.flatten(1)).view_as(q), as_complex(f))
    torch.testing.assert_close(qo, expected.detach())


# ---- bad input ---------------------------------------------------------------------------------------------


def test_odd_head_dim_rejected():
    with pytest.raises(ValueError, match="head_dim must be even"):
        fk.rope_freqs(7, torch.arange(3))
    with pytest.raises(ValueError, match="head_dim must be even"):
        fk.apply_rope(torch.randn(3, 2, 7), torch.randn(3, 3, 2))
    with pytest.raises(ValueError, match="head_dim must be even"):
        fk.qk_norm_rope(torch.randn(3, 2, 9), torch.randn(3, 2, 9), torch.randn(3, 4, 2))


def test_axes_dims_must_sum_to_head_dim():
    ids = torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="summing to head_dim=32"):
        fk.rope_freqs(32, ids, axes_dims=(8, 8, 8))
    with pytest.raises(ValueError, match="positive even sizes"):
        fk.rope_freqs(32, ids, axes_dims=(9, 11, 12))


def test_positions_of_wrong_rank():
    with pytest.raises(ValueError, match=r"positions must be 1-D or 2-D"):
        fk.rope_freqs(16, torch.zeros(2, 3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"positions must be \(T, 3\) for axes_dims"):
        fk.rope_freqs(16, torch.arange(4), axes_dims=(4, 4, 8))
    with pytest.raises(ValueError, match="need axes_dims"):
        fk.rope_freqs(18, torch.zeros(4, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="divisible by 4"):
        fk.rope_freqs(18, torch.zeros(4, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="integer or float"):
        fk.rope_freqs(16, torch.zeros(4, dtype=torch.bool))


def test_bad_scaling_arguments():
    with pytest.raises(ValueError, match="theta must be a finite number > 0"):
        fk.rope_freqs(16, torch.arange(3), theta=0.0)
    with pytest.raises(ValueError, match="linear_factor must be a finite number > 0"):
        fk.rope_freqs(16, torch.arange(3), linear_factor=-1.0)


def test_token_count_mismatch_between_freqs_and_x():
    f = fk.rope_freqs(16, torch.arange(5))
    with pytest.raises(ValueError, match=r"freqs must have shape \(6, 8, 2\)"):
        fk.apply_rope(torch.randn(6, 2, 16), f)
    with pytest.raises(ValueError, match=r"freqs must have shape \(4, 8, 2\)"):
        fk.apply_rope(torch.randn(2, 4, 2, 16), f)
    with pytest.raises(ValueError, match=r"freqs must have shape \(6, 8, 2\)"):
        fk.qk_norm_rope(torch.randn(6, 2, 16), torch.randn(6, 2, 16), f, norm=None)
    batched = torch.stack([f, f])
    with pytest.raises(ValueError, match=r"freqs must have shape \(3, 5, 8, 2\)"):
        fk.apply_rope(torch.randn(3, 5, 2, 16), batched)
    with pytest.raises(ValueError, match=r"freqs must have shape \(5, 6, 2\), got \(5, 8, 2\)"):
        fk.apply_rope(torch.randn(5, 2, 12), f)  # head_dim mismatch


def test_qk_shape_and_param_errors():
    f = fk.rope_freqs(16, torch.arange(4))
    q = torch.randn(4, 6, 16)
    with pytest.raises(ValueError, match="multiple of k heads"):
        fk.qk_norm_rope(q, torch.randn(4, 4, 16), f, norm=None)
    with pytest.raises(ValueError, match="k must match q"):
        fk.qk_norm_rope(q, torch.randn(3, 2, 16), f, norm=None)
    with pytest.raises(ValueError, match=r"q_norm weight must have shape \(96,\)"):
        fk.qk_norm_rope(q, torch.randn(4, 2, 16), f, (torch.randn(16), None), None, "layer_norm")
    with pytest.raises(ValueError, match=r"k_norm weight must have shape \(16,\)"):
        fk.qk_norm_rope(q, torch.randn(4, 2, 16), f, None, (torch.randn(32), None), "rms_norm")
    with pytest.raises(ValueError, match="norm=None"):
        fk.qk_norm_rope(q, torch.randn(4, 2, 16), f, (torch.randn(96), None), None, None)
    with pytest.raises(ValueError, match="norm must be one of"):
        fk.qk_norm_rope(q, torch.randn(4, 2, 16), f, norm="group_norm")
    with pytest.raises(TypeError, match="must match"):
        fk.qk_norm_rope(q, torch.randn(4, 2, 16, dtype=torch.float64), f, norm=None)
