"""Checkpoint and output compatibility with Lumina-T2X's DiT_Llama (lumina_t2i) and Lumina-Next's NextDiT
(lumina_next_t2i_mini).

The state_dicts are built from Lumina's key layout (written out independently of flagdit's modules, in
``support/lumina_checkpoints.py``), loaded strictly, and the outputs compared with a small eager
re-implementation of Lumina's forward pass in its own padded layout (pad tokens, key masks, complex RoPE,
SDPA), fp32 rel-L2 < 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.helpers import rel_l2
from support.lumina_checkpoints import LUMINA_CASES, P, inputs, make_case

import flagdit
from flagdit.configs import FlagDiTConfig

# ----------------------------------------------------------------------------------------------------------
# Lumina's forward, re-implemented functionally in its padded layout.


def _rms(x, w, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _lin(sd, name, x, bias=True):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias") if bias else None)


def _rope(x, freqs_cis):
    # x (B, L, H, D); freqs_cis complex (B or 1, L, D/2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


def _lumina_attention(sd, L, x, x_mask, freqs_cis, y, y_mask, n_heads, n_kv, qk_norm, scale):
    bsz, seqlen, dim = x.shape
    hd = dim // n_heads
    xq, xk, xv = _lin(sd, L + "wq", x, False), _lin(sd, L + "wk", x, False), _lin(sd, L + "wv", x, False)
    if qk_norm:
        xq = F.layer_norm(xq, xq.shape[-1:], sd[L + "q_norm.weight"], sd[L + "q_norm.bias"])
        xk = F.layer_norm(xk, xk.shape[-1:], sd[L + "k_norm.weight"], sd[L + "k_norm.bias"])
    xq = _rope(xq.view(bsz, seqlen, n_heads, hd), freqs_cis)
    xk = _rope(xk.view(bsz, seqlen, n_kv, hd), freqs_cis)
    xv = xv.view(bsz, seqlen, n_kv, hd)
    rep = n_heads // n_kv
    xk_r = xk.repeat_interleave(rep, dim=2)
    xv_r = xv.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(
        xq.transpose(1, 2),
        xk_r.transpose(1, 2),
        xv_r.transpose(1, 2),
        attn_mask=x_mask.bool().view(bsz, 1, 1, seqlen).expand(-1, n_heads, seqlen, -1),
        scale=scale,
    ).transpose(1, 2)
    yk = _lin(sd, L + "wk_y", y, False)
    if qk_norm:
        yk = F.layer_norm(yk, yk.shape[-1:], sd[L + "ky_norm.weight"], sd[L + "ky_norm.bias"])
    yk = yk.view(bsz, -1, n_kv, hd).repeat_interleave(rep, dim=2)
    yv = _lin(sd, L + "wv_y", y, False).view(bsz, -1, n_kv, hd).repeat_interleave(rep, dim=2)
    out_y = F.scaled_dot_product_attention(
        xq.transpose(1, 2),
        yk.transpose(1, 2),
        yv.transpose(1, 2),
        y_mask.view(bsz, 1, 1, -1).expand(bsz, n_heads, seqlen, -1),
    ).transpose(1, 2)
    out = out + out_y * sd[L + "gate"].tanh().view(1, 1, -1, 1)
    return _lin(sd, L + "wo", out.flatten(-2), False)


def _ffn(sd, L, x):
    return _lin(sd, L + "w2", F.silu(_lin(sd, L + "w1", x, False)) * _lin(sd, L + "w3", x, False), False)


def lumina_forward(sd, cfg: FlagDiTConfig, xs, t, cap, cap_mask, base_seqlen=None, linear=1.0, ntk=1.0):
    """Lumina-T2X DiT_Llama.forward (variant "flag") / NextDiT.forward (variant "next"), list input."""
    flag = cfg.variant == "flag"
    dim, hd, eps = cfg.dim, cfg.head_dim, cfg.norm_eps
    embeds, sizes, freqs = [], [], []
    for img in xs:
        c, h, w = img.shape
        sizes.append((h, w))
        e = _lin(sd, "x_embedder", img.view(c, h // P, P, w // P, P).permute(1, 3, 0, 2, 4).flatten(2))
        if flag:
            e = torch.cat([e, sd["eol_token"].view(1, 1, -1).expand(h // P, 1, -1)], dim=1)
        else:
            # NextDiT 2D RoPE table: pairs alternate (row, col) frequencies.
            inv = 1.0 / (cfg.rope_theta * ntk) ** (torch.arange(0, hd, 4)[: hd // 4].float() / hd) / linear
            ang_h = torch.outer(torch.arange(h // P).float(), inv)
            ang_w = torch.outer(torch.arange(w // P).float(), inv)
            fh = torch.polar(torch.ones_like(ang_h), ang_h)
            fw = torch.polar(torch.ones_like(ang_w), ang_w)
            grid = torch.stack(
                [fh[:, None, :].expand(-1, w // P, -1), fw[None, :, :].expand(h // P, -1, -1)], dim=-1
            ).flatten(2)
            freqs.append(grid.flatten(0, 1))
        embeds.append(e.flatten(0, 1))
    max_len = max(len(e) for e in embeds)
    mask = torch.zeros(len(xs), max_len, dtype=torch.int32)
    padded = []
    for i, e in enumerate(embeds):
        padded.append(torch.cat([e, sd["pad_token"].view(1, -1).expand(max_len - len(e), -1)]))
        mask[i, : len(e)] = 1
    x = torch.stack(padded)
    if flag:
        inv = 1.0 / ((cfg.rope_theta * ntk) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        ang = torch.outer(torch.arange(max_len).float() / linear, inv)
        freqs_cis = torch.polar(torch.ones_like(ang), ang).unsqueeze(0)
    else:
        freqs_cis = torch.stack([torch.cat([f, f[-1:].expand(max_len - len(f), -1)]) for f in freqs])
    half = 128
    fr = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * fr[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", temb)))
    mf = cap_mask.float().unsqueeze(-1)
    pool = (cap * mf).sum(1) / mf.sum(1)
    pool = F.layer_norm(pool, pool.shape[-1:], sd["cap_embedder.0.weight"], sd["cap_embedder.0.bias"])
    adaln = temb + _lin(sd, "cap_embedder.1", pool)
    y_mask = cap_mask.bool()
    scale = math.sqrt(math.log(max_len, base_seqlen) / hd) if base_seqlen else math.sqrt(1 / hd)
    for i in range(cfg.n_layers):
        L = f"layers.{i}."
        mod = _lin(sd, L + "adaLN_modulation.1", F.silu(adaln))
        y = _rms(cap, sd[L + "attention_y_norm.weight"], eps)
        attn = lambda h, L=L, y=y: _lumina_attention(
            sd, L + "attention.", h, mask, freqs_cis, y, y_mask, cfg.n_heads, cfg.kv_heads, cfg.qk_norm, scale
        )
        if flag:
            sh_a, sc_a, g_a, sh_m, sc_m, g_m = mod.chunk(6, dim=1)
            h = _rms(x, sd[L + "attention_norm.weight"], eps) * (1 + sc_a[:, None]) + sh_a[:, None]
            x = x + g_a[:, None] * attn(h)
            h = _rms(x, sd[L + "ffn_norm.weight"], eps) * (1 + sc_m[:, None]) + sh_m[:, None]
            x = x + g_m[:, None] * _ffn(sd, L + "feed_forward.", h)
        else:
            sc_a, g_a, sc_m, g_m = mod.chunk(4, dim=1)
            h = _rms(x, sd[L + "attention_norm1.weight"], eps) * (1 + sc_a[:, None])
            x = x + g_a[:, None].tanh() * _rms(attn(h), sd[L + "attention_norm2.weight"], eps)
            h = _rms(x, sd[L + "ffn_norm1.weight"], eps) * (1 + sc_m[:, None])
            x = x + g_m[:, None].tanh() * _rms(_ffn(sd, L + "feed_forward.", h), sd[L + "ffn_norm2.weight"], eps)
    mod = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(adaln))
    h = F.layer_norm(x, (dim,), eps=1e-6)
    if flag:
        shift, sc = mod.chunk(2, dim=1)
        h = h * (1 + sc[:, None]) + shift[:, None]
    else:
        h = h * (1 + mod[:, None])
    x = _lin(sd, "final_layer.linear", h)
    oc = cfg.out_channels
    outs = []
    for i, (h_, w_) in enumerate(sizes):
        cols = w_ // P + int(flag)
        item = x[i][: (h_ // P) * cols].view(h_ // P, cols, P, P, oc)
        if flag:
            item = item[:, :-1]
        outs.append(item.permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
    if cfg.learn_sigma:
        outs = [o.chunk(2, dim=0)[0] for o in outs]
    return outs


@pytest.mark.parametrize("name", list(LUMINA_CASES))
def test_state_dict_names_and_shapes_load_strictly(name):
    cfg, sd = make_case(name)
    model = flagdit.FlagDiT(cfg, backend="reference")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    # And the other way: our state_dict is exactly Lumina's key set.
    assert set(model.state_dict()) == set(sd)


@pytest.mark.parametrize("name", list(LUMINA_CASES))
def test_outputs_match_lumina_forward(name):
    cfg, sd = make_case(name)
    model = flagdit.FlagDiT(cfg, backend="reference")
    model.load_state_dict(sd, strict=True)
    xs, t, cap, mask = inputs(cfg)
    with torch.no_grad():
        ours = model(xs, t, cap, mask)
        theirs = lumina_forward(sd, cfg, xs, t, cap, mask)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert rel_l2(a, b) < 1e-4


@pytest.mark.parametrize("name", ["flag", "next"])
def test_extrapolation_matches_lumina(name):
    """Proportional attention (base_seqlen) and NTK / linear RoPE scaling, as Lumina's forward_with_cfg sets them."""
    cfg, sd = make_case(name, seed=3)
    model = flagdit.FlagDiT(cfg, backend="reference")
    model.load_state_dict(sd, strict=True)
    xs, t, cap, mask = inputs(cfg, seed=4)
    with torch.no_grad():
        for kw in (dict(base_seqlen=16), dict(ntk_factor=3.0), dict(linear_factor=2.0)):
            theirs = lumina_forward(
                sd,
                cfg,
                xs,
                t,
                cap,
                mask,
                kw.get("base_seqlen"),
                kw.get("linear_factor", 1.0),
                kw.get("ntk_factor", 1.0),
            )
            ours = model(xs, t, cap, mask, **kw)
            plain = model(xs, t, cap, mask)
            for a, b, c in zip(ours, theirs, plain):
                assert rel_l2(a, b) < 1e-4
                assert rel_l2(c, b) > 1e-4  # the option changed the output


def test_tensor_input_matches_lumina():
    cfg, sd = make_case("flag", seed=5)
    model = flagdit.FlagDiT(cfg, backend="reference")
    model.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 6, generator=g)
    t = torch.rand(2, generator=g)
    cap = torch.randn(2, 3, cfg.cap_feat_dim, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        ours = model(x, t, cap, mask)
        theirs = torch.stack(lumina_forward(sd, cfg, list(x), t, cap, mask))
    assert isinstance(ours, torch.Tensor) and ours.shape == (2, 4, 8, 6)
    assert rel_l2(ours, theirs) < 1e-4


def test_our_extra_nextframe_token_is_tolerated():
    """A config with [nextframe] has one extra parameter; Lumina's dict loads with strict=False, only it missing."""
    cfg, sd = make_case("flag")
    cfg.nextframe = True
    model = flagdit.FlagDiT(cfg)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["eof_token"] and result.unexpected_keys == []
