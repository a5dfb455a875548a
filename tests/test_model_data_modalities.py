"""The procedural data sets of every modality: layout through pack/unpack, the renderer, the audio round trip,
captions, and the errors bad arguments get."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flagdit_kernels as fk
from flagdit.data import DATASETS, MODALITIES, VOCAB, WordEncoder, audio, make_item, multiview
from flagdit.modality import fit_channels, narrow_channels

# The audio data set needs librosa (the [audio] extra), which the GPU machine's image lacks.
pytest.importorskip("librosa", reason="the audio modality needs librosa (pip install 'flagdit-kernels[audio]')")

PATCH = 2


def _tokens(shape) -> int:
    """Tokens of one latent: F * rows * (cols + [nextline]) + [nextframe]s between frames."""
    f = shape[1] if len(shape) == 4 else 1
    h, w = shape[-2] // PATCH, shape[-1] // PATCH
    return f * h * (w + 1) + f - 1


@pytest.mark.parametrize("modality", DATASETS)
def test_every_data_set_packs_and_unpacks_exactly(modality):
    items = [make_item(3, i, modality=modality) for i in range(4)]
    latents, channels = fit_channels([it.latent for it in items], 3)
    packed = fk.pack(latents, PATCH)
    assert packed.cu_seqlens.diff().tolist() == [_tokens(it.latent.shape) for it in items]
    back = fk.unpack(packed.patches, packed, 3, channels_last=False)
    for item, x in zip(items, narrow_channels(back, channels)):
        assert torch.equal(x, item.latent)


def test_items_have_their_modality_shape_and_range():
    for modality in MODALITIES:
        item = make_item(0, 1, modality=modality)
        assert item.modality == modality
        assert item.latent.min() >= -1 and item.latent.max() <= 1 and torch.isfinite(item.latent).all()
        c, f = item.latent.shape[0], item.latent.shape[1] if item.latent.dim() == 4 else None
        assert {"image": (3, None), "video": (3, 4), "multiview": (3, 4), "audio": (1, None)}[modality] == (c, f)
        assert (item.cameras is not None) == (modality == "multiview")
    assert make_item(0, 1, modality="audio").latent.shape[1] == audio.N_MELS
    assert [make_item(0, i, modality="mixed").modality for i in range(8)] == [*MODALITIES, *MODALITIES]
    widths = {make_item(0, i, modality="audio").latent.shape[-1] for i in range(30)}
    assert len(widths) >= 3 and all(w % PATCH == 0 for w in widths)  # clips of several durations


def test_items_are_a_pure_function_of_seed_and_index():
    for modality in DATASETS:
        a, b = make_item(5, 7, modality=modality), make_item(5, 7, modality=modality)
        assert torch.equal(a.latent, b.latent) and a.caption == b.caption
        other = make_item(5, 8, modality=modality)
        assert a.latent.shape != other.latent.shape or not torch.equal(a.latent, other.latent)


def test_captions_are_in_the_vocabulary_and_fit_the_encoder():
    encoder = WordEncoder(16)
    captions = [make_item(2, i, modality=m).caption for m in DATASETS for i in range(12)]
    feats, mask = encoder(captions)
    assert feats.shape == (len(captions), 8, 16) and (mask.sum(1) >= 3).all()
    assert VOCAB[:20] == ("<pad>", "a", "on", "moving", "red", "green", "blue", "yellow", "white", "black", "purple",
                          "orange", "circle", "square", "diamond", "bar", "left", "right", "up", "down")  # fmt: skip
    articles = [(c.split()[0], c.split()[1]) for c in captions]
    assert all((art == "an") == (word[0] in "aeiou") for art, word in articles if art in ("a", "an"))
    with pytest.raises(ValueError, match="9 words"):
        encoder(["a red circle on blue a red circle on"])


def test_multiview_views_see_the_scene_from_their_cameras():
    red_left = [multiview.Solid("cube", (1.0, 0.0, 0.0), (-0.45, 0.0, 0.0), 0.3),
                multiview.Solid("sphere", (0.0, 0.0, 1.0), (0.45, 0.0, 0.0), 0.3)]  # fmt: skip
    cams = multiview.ring_cameras(4, math.radians(20))
    assert torch.allclose(cams[:, 0], torch.tensor([0, math.pi / 2, math.pi, 3 * math.pi / 2]))
    views = multiview.render(red_left, cams, (16, 32))
    assert views.shape == (3, 4, 16, 32)

    def red_x(view):  # mean column of the red pixels
        red = (view[0] > 0) & (view[2] < -0.5)
        return torch.nonzero(red)[:, 1].float().mean().item()

    # From azimuth 0 (camera on +z) the cube at -x is on the left; from azimuth 180 degrees on the right.
    assert red_x(views[:, 0]) < 14 < 18 < red_x(views[:, 2])
    # From azimuth 90 degrees (camera on +x) the sphere at +x stands in front of the cube.
    blue = lambda v: ((v[2] > 0) & (v[0] < -0.5)).sum().item()
    assert blue(views[:, 1]) > blue(views[:, 3])
    # Each camera sees a different picture (outline, occlusion and shading change with the azimuth).
    assert len({tuple(v.flatten().tolist()) for v in views.unbind(1)}) == 4


def test_audio_round_trip_keeps_the_pitch_of_a_pure_tone():
    """waveform -> log-mel latent -> NNLS + Griffin-Lim waveform: the fundamental stays within 3%."""
    frames = 64
    n = audio.samples_for(frames)
    t = np.arange(n) / audio.SAMPLE_RATE
    for f0 in (180.0, 440.0, 1250.0):
        latent = audio.waveform_to_latent(0.5 * np.sin(2 * np.pi * f0 * t))
        assert latent.shape == (1, audio.N_MELS, frames)
        y = audio.latent_to_waveform(latent)
        assert y.shape == (n,) and np.isfinite(y).all() and np.abs(y).max() > 0.1
        spectrum = np.abs(np.fft.rfft(y * np.hanning(n), 1 << 17))
        k = int(spectrum.argmax())
        a, b, c = np.log(spectrum[k - 1 : k + 2])
        measured = (k + 0.5 * (a - c) / (a - 2 * b + c)) * audio.SAMPLE_RATE / (1 << 17)
        assert abs(measured / f0 - 1) < 0.03, (f0, measured)


def test_audio_latent_levels():
    """0 dB (latent 1) is a full-scale sine at a filter centre; silence is the -80 dB floor (latent -1)."""
    silence = audio.waveform_to_latent(np.zeros(audio.samples_for(8)))
    assert torch.equal(silence, -torch.ones(1, audio.N_MELS, 8))
    t = np.arange(audio.samples_for(32)) / audio.SAMPLE_RATE
    loud = audio.waveform_to_latent(np.sin(2 * np.pi * 1000 * t))
    assert 0.8 < loud.max() <= 1.0


def test_wav_file(tmp_path):
    import wave

    y = np.sin(np.linspace(0, 200, audio.samples_for(10))).astype(np.float32) * 2  # clipped to [-1, 1]
    audio.write_wav(tmp_path / "a.wav", y)
    with wave.open(str(tmp_path / "a.wav")) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 8000, y.size)
        pcm = np.frombuffer(f.readframes(y.size), dtype="<i2")
    assert pcm.max() == 32767 and pcm.min() == -32767


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="modality must be one of"):
        make_item(0, 0, modality="smell")
    with pytest.raises(ValueError, match="views must be an int >= 1"):
        make_item(0, 2, modality="multiview", views=0)
    with pytest.raises(ValueError, match="views must be an int >= 1"):
        multiview.ring_cameras(0, 0.3)
    with pytest.raises(ValueError, match=r"duration 0\.01 s is too short for one patch"):
        audio.frames_for(0.01)
    with pytest.raises(ValueError, match="duration must be a positive"):
        audio.frames_for(-1.0)
    with pytest.raises(ValueError, match="waveform must have >= 128 samples"):
        audio.waveform_to_latent(np.zeros(100))
    with pytest.raises(ValueError, match="video_fraction must be in"):
        make_item(0, 0, -0.5)
    assert audio.frames_for(0.016) == 2 and audio.frames_for(1.0) == 62


def test_stereo_wav_keeps_its_channels_and_bad_shapes_are_refused(tmp_path):
    import wave

    left = np.linspace(-0.5, 0.5, 300, dtype=np.float32)
    stereo = np.stack([left, -left])
    audio.write_wav(tmp_path / "s.wav", stereo)
    with wave.open(str(tmp_path / "s.wav")) as f:
        assert (f.getnchannels(), f.getnframes()) == (2, 300)  # 300 frames of 2 samples, not 600 mono frames
        pcm = np.frombuffer(f.readframes(300), dtype="<i2").reshape(300, 2)
    assert np.array_equal(pcm[:, 0], (left * 32767).round().astype("<i2"))
    assert np.array_equal(pcm[:, 1], -pcm[:, 0])
    with pytest.raises(ValueError, match=r"\(channels, samples\) with 1 to 8 channels, got shape \(300, 2\)"):
        audio.write_wav(tmp_path / "t.wav", stereo.T)
    with pytest.raises(ValueError, match="NaN"):
        audio.write_wav(tmp_path / "n.wav", np.full(10, np.nan))
    with pytest.raises(TypeError, match="complex"):
        audio.write_wav(tmp_path / "c.wav", np.zeros(10, dtype=np.complex64))


def test_integer_pcm_is_scaled_and_complex_input_refused(tmp_path):
    import wave

    t = np.arange(audio.samples_for(16)) / audio.SAMPLE_RATE
    y = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    audio.write_wav(tmp_path / "a.wav", y)
    with wave.open(str(tmp_path / "a.wav")) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    from_pcm, from_float = audio.waveform_to_latent(pcm), audio.waveform_to_latent(y)
    assert (from_pcm - from_float).abs().max() < 0.01  # quantization only; unscaled PCM saturates at 0 dB
    assert torch.equal(audio.waveform_to_latent(torch.from_numpy(pcm)), from_pcm)
    u8 = (np.round(y * 127) + 128).astype(np.uint8)
    loud = from_float > -0.5  # 8-bit quantization noise (-48 dB) fills the quiet bands
    assert (audio.waveform_to_latent(u8) - from_float)[loud].abs().max() < 0.1
    with pytest.raises(TypeError, match="complex"):
        audio.waveform_to_latent(y.astype(np.complex64) + 1j)
    with pytest.raises(TypeError, match="complex"):
        audio.waveform_to_latent(torch.from_numpy(y).to(torch.complex64))


def test_latents_the_inverse_cannot_take_are_clear_errors():
    with pytest.raises(ValueError, match="latent must be finite"):
        audio.latent_to_waveform(torch.full((1, audio.N_MELS, 8), float("nan")))
    with pytest.raises(ValueError, match="latent must have >= 2 frames"):
        audio.latent_to_waveform(torch.zeros(1, audio.N_MELS, 0))
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 0"):
        audio.frames_for(1.0, 0)
