"""One Flag-DiT for every modality: channel padding, the modality embedding, per-view camera embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from support.model_fixtures import any_modality_config, modality_inputs, randomized, small_config

import flagdit
import flagdit_kernels as fk
from flagdit.data import multiview
from flagdit.modality import ModalityConditioning, camera_features, fit_channels


@pytest.mark.parametrize("variant", ["flag", "next"])
def test_a_one_channel_latent_is_padded_in_and_cut_out(variant):
    model = randomized(flagdit.FlagDiT(any_modality_config(variant=variant), backend="reference"))
    xs, t, cap, mask, modality, cameras = modality_inputs()
    out = model(xs, t, cap, mask, modality=modality, cameras=cameras)
    assert [tuple(o.shape) for o in out] == [tuple(x.shape) for x in xs]
    padded = [xs[0], xs[1], torch.cat([xs[2], torch.zeros(2, 8, 10)])]
    same = model(padded, t, cap, mask, modality=modality, cameras=cameras)
    assert torch.equal(out[2], same[2][:1]) and torch.equal(out[0], same[0])


def test_conditioning_starts_as_the_identity_and_learns():
    xs, t, cap, mask, modality, cameras = modality_inputs()
    plain = randomized(flagdit.FlagDiT(small_config(), backend="reference"))
    model = flagdit.FlagDiT(any_modality_config(), backend="reference")
    assert model.load_state_dict(plain.state_dict(), strict=False).unexpected_keys == []
    ref = plain(xs, t, cap, mask)
    got = model(xs, t, cap, mask, modality=modality, cameras=cameras)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # zero-initialised: no change at the start
    loss = sum(o.square().mean() for o in got)
    loss.backward()
    assert model.conditioning.modality_embedding.weight.grad.abs().sum() > 0
    assert model.conditioning.camera_embedder[2].weight.grad.abs().sum() > 0


def test_camera_vectors_land_on_their_views_tokens():
    torch.manual_seed(0)
    cond = ModalityConditioning(0, True, dim=8, adaln_dim=8)
    torch.nn.init.normal_(cond.camera_embedder[2].weight)
    shapes = [(3, 4, 6), (3, 3, 4, 4), (3, 2, 2, 2)]
    cams = [None, multiview.ring_cameras(3, 0.2), multiview.ring_cameras(2, -0.4, start=1.0)]
    packed = fk.pack([torch.randn(s) for s in shapes], 2)
    tokens = torch.randn(packed.kind.shape[0], 8)
    ada = torch.randn(3, 8)
    ada_out, out = cond(ada, tokens, packed.cu_seqlens, packed.positions[:, 0], packed.shapes, None, cams)
    assert torch.equal(ada_out, ada)
    delta = out - tokens
    cu = packed.cu_seqlens.tolist()
    assert torch.equal(delta[cu[0] : cu[1]], torch.zeros(cu[1] - cu[0], 8))  # no cameras: nothing added
    emb = cond.camera_embedder(camera_features(torch.cat([cams[1], cams[2]])))
    for b, first in ((1, 0), (2, 3)):
        frames = packed.positions[cu[b] : cu[b + 1], 0].long()
        assert torch.allclose(delta[cu[b] : cu[b + 1]], emb[first + frames], atol=1e-6)
    assert frames.unique().tolist() == [0, 1]


def test_camera_features_are_periodic_in_azimuth():
    cams = torch.tensor([[0.3, 0.2], [0.3 + 2 * math.pi, 0.2], [0.3 + math.pi, 0.2]])
    f = camera_features(cams)
    assert f.shape == (3, 10) and torch.allclose(f[0], f[1], atol=1e-5) and not torch.allclose(f[0], f[2])


def test_sampling_conditions_both_guidance_branches():
    model = randomized(flagdit.FlagDiT(any_modality_config(), backend="reference"))
    xs, _, cap, mask, modality, cameras = modality_inputs()
    shapes = [tuple(x.shape) for x in xs]
    out = flagdit.sample(model, shapes, cap, mask, steps=2, cfg_scale=2.0, modality=modality, cameras=cameras)
    assert [tuple(o.shape) for o in out] == shapes and all(torch.isfinite(o).all() for o in out)
    other = flagdit.sample(model, shapes, cap, mask, steps=2, cfg_scale=2.0, modality=["image"] * 3,
                           cameras=cameras, noise=[torch.zeros(s) for s in shapes])  # fmt: skip
    base = flagdit.sample(model, shapes, cap, mask, steps=2, cfg_scale=2.0, modality=modality, cameras=cameras,
                          noise=[torch.zeros(s) for s in shapes])  # fmt: skip
    assert not torch.equal(other[2], base[2])  # the modality vector reaches the output
    with pytest.raises(ValueError, match="modality must have one entry per shape"):
        flagdit.sample(model, shapes, cap, mask, steps=1, modality=["image"])


def test_bad_conditioning_is_named():
    model = flagdit.FlagDiT(any_modality_config(), backend="reference")
    plain = flagdit.FlagDiT(small_config(), backend="reference")
    xs, t, cap, mask, modality, _ = modality_inputs()
    with pytest.raises(ValueError, match="modality must name one of"):
        model(xs, t, cap, mask, modality=["image", "smell", "audio"])
    with pytest.raises(ValueError, match=r"modality indices must be in \[0, 4\)"):
        model(xs, t, cap, mask, modality=[0, 1, 9])
    with pytest.raises(TypeError, match="one entry per sample"):
        model(xs, t, cap, mask, modality="image")
    with pytest.raises(ValueError, match=r"cameras\[1\] must be \(4, 2\)"):
        model(xs, t, cap, mask, cameras=[None, multiview.ring_cameras(3, 0.1), None])
    with pytest.raises(ValueError, match="cameras must have one entry per sample"):
        model(xs, t, cap, mask, cameras=[None, multiview.ring_cameras(4, 0.1)])
    with pytest.raises(ValueError, match="n_modalities=0"):
        plain(xs, t, cap, mask, modality=modality)
    with pytest.raises(ValueError, match=r"latent 0 has 4 channels; this model takes 1 to 3"):
        model([torch.randn(4, 4, 4), *xs[1:]], t, cap, mask)
    with pytest.raises(ValueError, match="n_modalities must be >= 0"):
        small_config(n_modalities=-1)
    assert fit_channels([torch.ones(1, 2, 2)], 3)[0][0][1:].abs().sum() == 0


def test_num_params_counts_the_conditioning():
    c = any_modality_config()
    assert flagdit.FlagDiT(c).num_params() == c.num_params() > small_config().num_params()
