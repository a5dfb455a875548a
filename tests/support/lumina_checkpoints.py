"""Small Lumina-T2X (DiT_Llama, "flag") and Lumina-Next (NextDiT, "next") checkpoints for the model tests: the
state_dict names and shapes written out from Lumina's key layout (independently of flagdit's modules), random
weights everywhere, and a batch of inputs."""

from __future__ import annotations

import math

import torch

from flagdit.configs import FlagDiTConfig

P = 2  # the patch size


def lumina_shapes(variant, dim, n_layers, n_heads, n_kv, y_dim, ffn, in_c, learn_sigma, qk_norm):
    """Parameter names and shapes of DiT_Llama ("flag") / NextDiT ("next") as their __init__ creates them."""
    hd = dim // n_heads
    a = min(dim, 1024)
    kv = n_kv * hd
    out = P * P * (2 * in_c if learn_sigma else in_c)
    s = {
        "x_embedder.weight": (dim, P * P * in_c),
        "x_embedder.bias": (dim,),
        "t_embedder.mlp.0.weight": (a, 256),
        "t_embedder.mlp.0.bias": (a,),
        "t_embedder.mlp.2.weight": (a, a),
        "t_embedder.mlp.2.bias": (a,),
        "cap_embedder.0.weight": (y_dim,),
        "cap_embedder.0.bias": (y_dim,),
        "cap_embedder.1.weight": (a, y_dim),
        "cap_embedder.1.bias": (a,),
        "final_layer.linear.weight": (out, dim),
        "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": ((2 if variant == "flag" else 1) * dim, a),
        "final_layer.adaLN_modulation.1.bias": ((2 if variant == "flag" else 1) * dim,),
        "pad_token": (dim,),
    }
    if variant == "flag":
        s["eol_token"] = (dim,)
    for i in range(n_layers):
        L = f"layers.{i}."
        s.update(
            {
                L + "attention.wq.weight": (n_heads * hd, dim),
                L + "attention.wk.weight": (kv, dim),
                L + "attention.wv.weight": (kv, dim),
                L + "attention.wk_y.weight": (kv, y_dim),
                L + "attention.wv_y.weight": (kv, y_dim),
                L + "attention.gate": (n_heads,),
                L + "attention.wo.weight": (dim, n_heads * hd),
                L + "feed_forward.w1.weight": (ffn, dim),
                L + "feed_forward.w2.weight": (dim, ffn),
                L + "feed_forward.w3.weight": (ffn, dim),
                L + "adaLN_modulation.1.weight": ((6 if variant == "flag" else 4) * dim, a),
                L + "adaLN_modulation.1.bias": ((6 if variant == "flag" else 4) * dim,),
                L + "attention_y_norm.weight": (y_dim,),
            }
        )
        if qk_norm:
            for n, w in (("q_norm", n_heads * hd), ("k_norm", kv), ("ky_norm", kv)):
                s[L + f"attention.{n}.weight"] = (w,)
                s[L + f"attention.{n}.bias"] = (w,)
        norms = ("attention_norm", "ffn_norm") if variant == "flag" else (
            "attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"
        )  # fmt: skip
        for n in norms:
            s[L + f"{n}.weight"] = (dim,)
    return s


def random_state(shapes: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights everywhere (also where Lumina zero-initializes), so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith(("norm.weight", "norm1.weight", "norm2.weight", "cap_embedder.0.weight")):
            v = 1 + 0.2 * torch.randn(shape, generator=g)
        elif len(shape) == 2:
            v = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            v = 0.3 * torch.randn(shape, generator=g)
        out[k] = v
    return out


LUMINA_CASES = {
    # Flag-DiT: MHA, QK-norm, learn_sigma, [nextline] tokens.
    "flag": dict(variant="flag", dim=64, n_layers=2, n_heads=4, n_kv_heads=None, qk_norm=True, learn_sigma=True),
    # Flag-DiT without QK-norm, GQA.
    "flag-gqa-noqk": dict(
        variant="flag", dim=64, n_layers=1, n_heads=4, n_kv_heads=2, qk_norm=False, learn_sigma=False
    ),
    # Next-DiT: GQA like the 2B model, sandwich norms, 2D RoPE.
    "next": dict(variant="next", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, qk_norm=True, learn_sigma=True),
}


def make_case(name: str, seed: int = 0):
    kw = LUMINA_CASES[name]
    cfg = FlagDiTConfig(
        in_channels=4,
        multiple_of=16,
        cap_feat_dim=24,
        nextline=kw["variant"] == "flag",
        nextframe=False,
        **kw,
    )
    shapes = lumina_shapes(
        cfg.variant, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.cap_feat_dim, cfg.ffn_dim,
        cfg.in_channels, cfg.learn_sigma, cfg.qk_norm,
    )  # fmt: skip
    return cfg, random_state(shapes, seed)


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(4, 6, 10, generator=g), torch.randn(4, 8, 4, generator=g), torch.randn(4, 2, 14, generator=g)]
    t = torch.rand(3, generator=g)
    cap = torch.randn(3, 5, cfg.cap_feat_dim, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    return xs, t, cap, mask
