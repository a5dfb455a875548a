"""The thin Flag-DiT on the reference backend: configs, packed forward, conditioning, flow loss, sampler."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flagdit
import flagdit_kernels as fk
from flagdit import flow
from flagdit.sampling import shifted_times
from flagdit_kernels import _dispatch

MODEL_OPS = ("pack", "unpack", "rope_freqs", "qk_norm_rope", "varlen_attention", "rms_norm", "rms_norm_modulate")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def small_config(variant="flag", **kw):
    base = dict(in_channels=3, dim=64, n_layers=2, n_heads=4, multiple_of=16, cap_feat_dim=16, variant=variant)
    if variant == "next":
        base.update(n_kv_heads=2, nextline=False)
    base.update(kw)
    return flagdit.FlagDiTConfig(**base)


def randomized(model, seed=0):
    """Random weights everywhere, also where the model zero-initializes (gates, adaLN, final layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def batch(cap_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, 6, 10, generator=g), torch.randn(3, 3, 4, 6, generator=g), torch.randn(3, 2, 2, generator=g)]
    t = torch.rand(3, generator=g)
    cap = torch.randn(3, 4, cap_dim, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    return xs, t, cap, mask


# ---- configs --------------------------------------------------------------------------------------------


def test_named_configs():
    assert set(flagdit.configs) == {"tiny", "flag-dit-600m", "next-dit-2b", "lumina-t2i-5b", "flag-dit-7b"}
    c = flagdit.configs["flag-dit-600m"]
    assert (c.dim, c.n_layers, c.n_heads, c.variant) == (1536, 16, 32, "flag")
    c = flagdit.configs["next-dit-2b"]
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.variant) == (2304, 24, 32, 8, "next")
    assert (flagdit.configs["lumina-t2i-5b"].dim, flagdit.configs["flag-dit-7b"].dim) == (3072, 4096)
    # The FFN width follows Lumina: 2/3 * 4 * dim rounded up to multiple_of.
    assert flagdit.configs["lumina-t2i-5b"].ffn_dim == 8192
    # Lookups are copies.
    flagdit.configs["tiny"].dim = 7
    assert flagdit.configs["tiny"].dim == 128
    for name in flagdit.configs:
        cfg = flagdit.configs[name]
        assert {f.name for f in dataclasses.fields(cfg)} >= {
            "patch_size", "in_channels", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
            "ffn_dim_multiplier", "norm_eps", "learn_sigma", "qk_norm", "cap_feat_dim", "variant", "nextline",
            "nextframe",
        }  # fmt: skip
    tiny = flagdit.configs["tiny"]
    assert flagdit.FlagDiT(tiny).num_params() == tiny.num_params()
    assert 0.5e9 < flagdit.configs["flag-dit-600m"].num_params() < 0.8e9


def test_bad_configs():
    with pytest.raises(ValueError, match="variant must be one of"):
        small_config(variant="dit")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        small_config(dim=66)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        small_config(n_kv_heads=3)
    with pytest.raises(KeyError, match="unknown config"):
        flagdit.get_config("huge")


# ---- forward --------------------------------------------------------------------------------------------


def test_init_is_zero_output_and_shapes():
    model = flagdit.FlagDiT(small_config(learn_sigma=True), backend="reference")
    xs, t, cap, mask = batch()
    out = model(xs, t, cap, mask)
    assert [tuple(o.shape) for o in out] == [tuple(x.shape) for x in xs]
    # Zero-initialized final layer: the untrained model predicts zero velocity.
    assert all(o.abs().max() == 0 for o in out)


@pytest.mark.parametrize("variant", ["flag", "next"])
def test_packed_batch_equals_items_alone(variant):
    """Packing never mixes samples: each item's output is the same alone and in the mixed batch."""
    model = randomized(flagdit.FlagDiT(small_config(variant), backend="reference"), seed=1)
    xs, t, cap, mask = batch(seed=2)
    with torch.no_grad():
        together = model(xs, t, cap, mask)
        for i in range(len(xs)):
            alone = model([xs[i]], t[i : i + 1], cap[i : i + 1], mask[i : i + 1])[0]
            assert _rel(together[i], alone) < 1e-5


@pytest.mark.parametrize("variant", ["flag", "next"])
def test_gradients_reach_every_used_parameter(variant):
    model = randomized(flagdit.FlagDiT(small_config(variant, learn_sigma=True), backend="reference"), seed=3)
    xs, t, cap, mask = batch(seed=4)
    for x in xs:
        x.requires_grad_(True)
    out = model(xs, t, cap, mask)
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    for name, p in model.named_parameters():
        if name == "pad_token":  # kept for Lumina checkpoints; packed tokens need no padding
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in xs)


def test_placeholder_tokens_condition_the_output():
    """The [nextline] and [nextframe] embeddings are in the sequence (a video item needs [nextframe])."""
    model = randomized(flagdit.FlagDiT(small_config(), backend="reference"), seed=5)
    xs, t, cap, mask = batch(seed=6)
    with torch.no_grad():
        ref = model(xs, t, cap, mask)
        model.eof_token.add_(1.0)
        moved = model(xs, t, cap, mask)
        model.eof_token.sub_(1.0)
        model.eol_token.add_(1.0)
        moved_eol = model(xs, t, cap, mask)
    assert _rel(moved[0], ref[0]) < 1e-6 and _rel(moved[1], ref[1]) > 1e-3  # only the video has [nextframe]
    assert all(_rel(a, b) > 1e-3 for a, b in zip(moved_eol, ref))


def test_caption_conditions_output_and_empty_caption_is_finite():
    model = randomized(flagdit.FlagDiT(small_config(), backend="reference"), seed=7)
    xs, t, cap, mask = batch(seed=8)
    with torch.no_grad():
        ref = model(xs, t, cap, mask)
        cap2 = cap.clone()
        cap2[1, 3] += 1.0  # a valid token of sample 1
        out = model(xs, t, cap2, mask)
        cap3 = cap.clone()
        cap3[0, 3] += 100.0  # a masked token of sample 0: no effect
        out3 = model(xs, t, cap3, mask)
        empty = mask.clone()
        empty[2] = 0
        out4 = model(xs, t, cap, empty)
    assert _rel(out[1], ref[1]) > 1e-4 and _rel(out[0], ref[0]) < 1e-6
    assert all(_rel(a, b) < 1e-6 for a, b in zip(out3, ref))
    assert all(torch.isfinite(o).all() for o in out4)


def test_text_context_reuse_equals_fresh_encoding():
    model = randomized(flagdit.FlagDiT(small_config("next"), backend="reference"), seed=9)
    xs, t, cap, mask = batch(seed=10)
    with torch.no_grad():
        text = model.encode_text(cap, mask, cache_kv=True)
        assert all(kv is not None for kv in text.kv)
        a = model(xs, t, cap, mask)
        b = model(xs, t, text=text)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("when", ["constructed", "assigned"])
def test_every_op_gets_the_model_backend(monkeypatch, when):
    """The model's backend reaches every op, given to the constructor or assigned to ``model.backend`` later."""
    seen = []
    real = _dispatch.resolve

    def spy(op, like, backend=None, prefer=None):
        seen.append((op, backend, prefer))
        return real(op, like, backend, prefer)

    monkeypatch.setattr(_dispatch, "resolve", spy)
    for variant in ("flag", "next"):
        if when == "constructed":
            model = flagdit.FlagDiT(small_config(variant), backend="reference")
        else:
            model = flagdit.FlagDiT(small_config(variant), backend="cpu")
            model.backend = "reference"
        model(*batch())
    ops = {op for op, _, _ in seen}
    assert ops >= set(MODEL_OPS) | {"gated_residual_rms_norm", "embed_packed"}
    assert all(b is None and p == "reference" for _, b, p in seen)


def test_an_unknown_model_backend_is_an_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        flagdit.FlagDiT(small_config(), backend="tritn")


def test_bf16_forward_runs():
    model = randomized(flagdit.FlagDiT(small_config(), backend="reference"), seed=11).to(torch.bfloat16)
    ref = randomized(flagdit.FlagDiT(small_config(), backend="reference"), seed=11)
    xs, t, cap, mask = batch(seed=12)
    with torch.no_grad():
        out = model([x.bfloat16() for x in xs], t, cap.bfloat16(), mask)
        want = ref(xs, t, cap, mask)
    assert all(o.dtype == torch.bfloat16 for o in out)
    assert all(_rel(o, w) < 5e-2 for o, w in zip(out, want))


def test_bad_inputs():
    model = flagdit.FlagDiT(small_config(), backend="reference")
    xs, t, cap, mask = batch()
    with pytest.raises(ValueError, match=r"cap_feats must be \(B, Lt, 16\)"):
        model(xs, t, cap[..., :8], mask)
    with pytest.raises(ValueError, match="cap_mask must be"):
        model(xs, t, cap, mask[:, :2])
    with pytest.raises(ValueError, match="batch mismatch"):
        model(xs[:2], t[:2], cap, mask)
    with pytest.raises(ValueError, match="give cap_feats and cap_mask"):
        model(xs, t)


def _fused_backends():
    out = []
    for b in ("triton", "cuda", "cpu"):
        if any(b in _dispatch.available_backends(op, "cpu") for op in MODEL_OPS if op not in ("pack", "unpack")):
            out.append(b)
    return out


@pytest.mark.parametrize(
    "backend", _fused_backends() or [pytest.param("none", marks=pytest.mark.skip("no fused backend is registered yet"))]
)
@pytest.mark.parametrize("variant", ["flag", "next"])
def test_fused_backend_matches_reference(backend, variant):
    """Same weights, fused vs reference backend: outputs and gradients (fp32, tiny shapes for the interpreter)."""
    cfg = small_config(variant, n_layers=1)
    ref = randomized(flagdit.FlagDiT(cfg, backend="reference"), seed=13)
    fused = flagdit.FlagDiT(cfg, backend=backend)
    fused.load_state_dict(ref.state_dict(), strict=True)  # a state_dict saved by one loads in the other
    xs, t, cap, mask = batch(seed=14)
    xs = xs[:2]
    outs = []
    for model in (ref, fused):
        out = model(xs, t[:2], cap[:2], mask[:2])
        sum((o * o.detach().sin()).sum() for o in out).backward()
        outs.append(out)
    for a, b in zip(outs[1], outs[0]):
        assert _rel(a, b) < 1e-4
    grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        if grads[name].grad is None:
            assert p.grad is None
            continue
        want = grads[name].grad
        if want.norm() < 1e-6:
            # Mathematically zero (e.g. a key bias under softmax shift invariance): both sides are round-off.
            assert p.grad.norm() < 1e-5, name
            continue
        assert _rel(p.grad, want) < 1e-3, name


# ---- flow matching --------------------------------------------------------------------------------------


def test_training_loss_is_per_item_velocity_mse():
    model = randomized(flagdit.FlagDiT(small_config(), backend="reference"), seed=15)
    xs, t, cap, mask = batch(seed=16)
    g = torch.Generator().manual_seed(0)
    x0 = [torch.randn(x.shape, generator=g) for x in xs]
    per_item = flow.training_loss(model, xs, cap, mask, t=t, x0=x0, reduction="none")
    with torch.no_grad():
        v = model([ti * b + (1 - ti) * a for ti, a, b in zip(t, x0, xs)], t, cap, mask)
    want = torch.stack([((b - a - o) ** 2).mean() for a, b, o in zip(x0, xs, v)])
    assert torch.allclose(per_item, want, rtol=1e-5, atol=1e-7)
    loss = flow.training_loss(model, xs, cap, mask, t=t, x0=x0)
    assert loss.shape == () and torch.allclose(loss, want.mean())
    loss.backward()
    assert model.x_embedder.weight.grad.abs().sum() > 0
    # Random t and noise when not given; tensor batches work too.
    assert torch.isfinite(flow.training_loss(model, torch.randn(2, 3, 4, 4), cap[:2], mask[:2], t_dist="logit-normal"))


def test_time_distributions():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_t(4000, "uniform", generator=g)
    ln = flow.sample_t(4000, "logit-normal", generator=g)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.03 and abs(u.std() - 12**-0.5) < 0.02
    assert ln.min() > 0 and ln.max() < 1 and abs(ln.median() - 0.5) < 0.05 and ln.std() < u.std()
    with pytest.raises(ValueError, match="t_dist must be one of"):
        flow.sample_t(2, "beta")


# ---- sampling -------------------------------------------------------------------------------------------


def test_shifted_times():
    t = shifted_times(10, 4.0)
    assert t[0] == 0 and t[-1] == 1 and (t[1:] > t[:-1]).all()
    assert abs(t[5].item() - 0.5 / (0.5 + 4 - 2)) < 1e-6
    assert torch.allclose(shifted_times(4, 1.0), torch.linspace(0, 1, 5))


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_sampler_steps_match_hand_integration(solver):
    model = randomized(flagdit.FlagDiT(small_config("next"), backend="reference"), seed=17).eval()
    shapes = [(3, 4, 6), (3, 2, 4, 4)]
    _, _, cap, mask = batch(seed=18)
    cap, mask = cap[:2], mask[:2]
    g = torch.Generator().manual_seed(1)
    noise = [torch.randn(s, generator=g) for s in shapes]
    got = flagdit.sample(model, shapes, cap, mask, steps=2, solver=solver, shift=3.0, cfg_scale=2.5, noise=noise)
    neg, neg_mask = flow.null_caption(cap, mask)

    def v(x, t):
        with torch.no_grad():
            tt = torch.full((2,), t)
            c = model(x, tt, cap, mask)
            u = model(x, tt, neg, neg_mask)
        return [b + 2.5 * (a - b) for a, b in zip(c, u)]

    ts = shifted_times(2, 3.0).tolist()
    x = noise
    for i in range(2):
        dt = ts[i + 1] - ts[i]
        k = v(x, ts[i])
        if solver == "midpoint":
            k = v([a + 0.5 * dt * b for a, b in zip(x, k)], ts[i] + 0.5 * dt)
        x = [a + dt * b for a, b in zip(x, k)]
    assert [tuple(o.shape) for o in got] == shapes
    for a, b in zip(got, x):
        assert _rel(a, b) < 1e-5


def test_sampler_without_guidance_and_bad_args():
    model = randomized(flagdit.FlagDiT(small_config(), backend="reference"), seed=19)
    _, _, cap, mask = batch()
    out = flagdit.sample(model, [(3, 4, 4)], cap[:1], mask[:1], steps=1, cfg_scale=1.0, generator=torch.Generator())
    assert out[0].shape == (3, 4, 4) and torch.isfinite(out[0]).all()
    with pytest.raises(ValueError, match="solver must be one of"):
        flagdit.sample(model, [(3, 4, 4)], cap[:1], mask[:1], solver="rk4")
    with pytest.raises(ValueError, match="1 shapes but 3 captions"):
        flagdit.sample(model, [(3, 4, 4)], cap, mask)


def test_public_names():
    for name in ("FlagDiT", "configs", "flow", "sample", "load_lumina"):
        assert hasattr(flagdit, name)
    assert callable(flagdit.flow.training_loss)
    assert fk.nn.GatedVarlenAttention is not None


def test_model_benchmark_cases_run_in_quick_mode():
    from flagdit.bench import model as bench_model

    cases = bench_model.cases(quick=True, device=torch.device("cpu"))
    assert {c.op for c in cases} == {"model_train_step", "model_sample_step"}
    for case in cases:
        assert case.flops > 0 and case.notes["tokens"] > 0 and "reference" in case.impls
        case.impls["reference"]()()


BAD_FIELDS = [
    (dict(n_heads=0), ValueError, "n_heads must be >= 1, got 0"),
    (dict(dim=32, n_heads=4), ValueError, r"head_dim = dim / n_heads = 32 / 4 = 8: the attention takes multiples"),
    (dict(dim=264 * 4, n_heads=4), ValueError, "= 264: the attention takes multiples of 8 from 16 to 256"),
    (dict(multiple_of=0), ValueError, "multiple_of must be >= 1"),
    (dict(patch_size=0), ValueError, "patch_size must be >= 1"),
    (dict(norm_eps=-1.0), ValueError, "norm_eps must be a finite number > 0"),
    (dict(norm_eps=float("nan")), ValueError, "norm_eps must be a finite number > 0"),
    (dict(cap_feat_dim=0), ValueError, "cap_feat_dim must be >= 1"),
    (dict(in_channels=0), ValueError, "in_channels must be >= 1"),
    (dict(dim=64.0), TypeError, "dim must be an int, got 64.0"),
    (dict(n_layers=True), TypeError, "n_layers must be an int"),
    (dict(qk_norm=1), TypeError, "qk_norm must be a bool"),
    (dict(n_kv_heads=0), ValueError, "n_kv_heads must be >= 1"),
    (dict(ffn_dim_multiplier=0.0), ValueError, "ffn_dim_multiplier must be a finite number > 0"),
    (dict(rope_theta="big"), TypeError, "rope_theta must be a number"),
    (dict(n_modalities=-1), ValueError, "n_modalities must be >= 0"),
]


@pytest.mark.parametrize(("fields", "error", "message"), BAD_FIELDS, ids=[str(f) for f, _, _ in BAD_FIELDS])
def test_configs_a_model_cannot_take_are_refused_on_construction(fields, error, message):
    with pytest.raises(error, match=message):
        small_config(**fields)


def test_a_config_changed_in_place_is_checked_when_the_model_is_built():
    config = small_config()
    config.n_heads = 8  # head_dim 8
    with pytest.raises(ValueError, match="head_dim = dim / n_heads = 64 / 8 = 8"):
        flagdit.FlagDiT(config)
