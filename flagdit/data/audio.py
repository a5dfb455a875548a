"""Audio clips of synthesized sound as 1-channel log-mel spectrogram latents, and their way back to a waveform.

Sounds: pure tones, exponential pitch sweeps, major and minor triads, and band-limited noise bursts, each low
or high ("a low tone", "a rising high tone", "a high minor chord", "a low noise burst"), with 10 ms fades so
no clip starts or ends on a click. Durations vary from 0.5 to 1 s, so the latent's width varies too.

Spectrograms come from librosa (a pure-Python package on numpy/scipy/numba, so it installs beside any torch;
torchaudio's wheels are built against one torch release each): a power mel spectrogram (HTK mel scale,
unnormalized triangular filters, so 0 dB is a full-scale sine at a filter's centre), converted to dB and
clipped to [-80, 0], then mapped linearly to [-1, 1]. The latent is ``(1, N_MELS, frames)``: mel bins down
the rows (row 0 is the lowest band), time along the columns. The way back is librosa's NNLS mel inversion
followed by its Griffin-Lim phase reconstruction.

Why these settings: at 8 kHz with a 256-point FFT (31.25 Hz bins) 64 mel bands are narrow enough below 1 kHz
that a tone's mel pattern pins its frequency; measured over 40 tones from 120 to 1800 Hz the round trip
keeps the fundamental within 2% (median 0.2%), where 32 or 48 bands lose up to 9%.
"""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path

import numpy as np
import torch

from .item import Item

SAMPLE_RATE = 8000
N_FFT = 256
HOP = 128
N_MELS = 64
F_MAX = SAMPLE_RATE / 2
TOP_DB = 80.0
REF_POWER = (N_FFT / 4) ** 2  # |STFT|^2 of a full-scale sine under a periodic Hann window
GRIFFIN_LIM_ITERS = 32
FRAME_CHOICES = (32, 40, 48, 56, 64)  # spectrogram frames of the training clips: 0.5 to 1.0 s
SOUNDS = ("tone", "rising", "falling", "major", "minor", "noise")
REGISTERS = {"low": (150.0, 300.0), "high": (600.0, 1200.0)}
WORDS = ("tone", "rising", "falling", "low", "high", "major", "minor", "chord", "noise", "burst")
_FADE_S = 0.01
MAX_WAV_CHANNELS = 8


def _librosa():
    try:
        import librosa
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the audio modality needs librosa: pip install 'flagdit-kernels[audio]'") from e
    return librosa


def _mel_kwargs() -> dict:
    return dict(sr=SAMPLE_RATE, n_fft=N_FFT, fmin=0.0, fmax=F_MAX, htk=True, norm=None)


def frames_for(duration: float, patch_size: int = 2) -> int:
    """Spectrogram frames for ``duration`` seconds, rounded down to a multiple of ``patch_size``."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
        raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
    frames = (1 + int(duration * SAMPLE_RATE) // HOP) // patch_size * patch_size
    if frames < patch_size:
        shortest = (patch_size - 1) * HOP / SAMPLE_RATE
        raise ValueError(
            f"duration {duration} s is too short for one patch: it needs >= {patch_size} spectrogram frames "
            f"({shortest:.3f} s at {SAMPLE_RATE} Hz with hop {HOP})"
        )
    return frames


def samples_for(frames: int) -> int:
    """Waveform length whose centred STFT has exactly ``frames`` frames."""
    return (frames - 1) * HOP


def _amplitudes(waveform: np.ndarray | torch.Tensor) -> np.ndarray:
    """``waveform`` as float32 amplitudes: floats as they are, integer PCM scaled to [-1, 1] (int16 as
    :func:`write_wav` writes it: / 32768; unsigned 8-bit WAV samples centred on 128)."""
    raw = np.asarray(waveform.detach().cpu() if isinstance(waveform, torch.Tensor) else waveform)
    if np.iscomplexobj(raw):
        raise TypeError(f"waveform must be real samples, got complex dtype {raw.dtype}")
    if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.number):
        raise TypeError(f"waveform must hold float amplitudes or integer PCM samples, got dtype {raw.dtype}")
    if np.issubdtype(raw.dtype, np.signedinteger):
        return (raw / float(2 ** (8 * raw.dtype.itemsize - 1))).astype(np.float32)
    if raw.dtype == np.uint8:
        return ((raw.astype(np.float32) - 128) / 128).astype(np.float32)
    if np.issubdtype(raw.dtype, np.unsignedinteger):
        raise TypeError(f"waveform: unsigned PCM other than 8-bit has no standard scale, got dtype {raw.dtype}")
    return raw.astype(np.float32)


def waveform_to_latent(waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(T,)`` samples at :data:`SAMPLE_RATE` -> ``(1, N_MELS, 1 + T // HOP)`` log-mel latent in [-1, 1].
    Float samples are amplitudes; integer samples are PCM (int16 as :func:`write_wav` writes) and are scaled to
    [-1, 1] first; complex samples are a ``TypeError`` (dropping the imaginary part would be silent)."""
    y = _amplitudes(waveform)
    if y.ndim != 1:
        raise ValueError(f"waveform must be 1-D (samples,), got shape {y.shape}")
    if y.shape[0] < HOP:
        raise ValueError(f"waveform must have >= {HOP} samples (one hop), got {y.shape[0]}")
    if not np.isfinite(y).all():
        raise ValueError("waveform must be finite")
    librosa = _librosa()
    power = librosa.feature.melspectrogram(y=y, hop_length=HOP, n_mels=N_MELS, power=2.0, **_mel_kwargs())
    db = np.clip(librosa.power_to_db(power, ref=REF_POWER, top_db=None), -TOP_DB, 0.0)
    return torch.from_numpy(db / (TOP_DB / 2) + 1).float().unsqueeze(0)


def latent_to_waveform(latent: torch.Tensor, n_iter: int = GRIFFIN_LIM_ITERS, seed: int = 0) -> np.ndarray:
    """``(1, N_MELS, frames)`` latent -> ``(samples_for(frames),)`` float32 waveform (NNLS + Griffin-Lim)."""
    if latent.dim() != 3 or latent.shape[0] != 1 or latent.shape[1] != N_MELS:
        raise ValueError(f"latent must be (1, {N_MELS}, frames), got {tuple(latent.shape)}")
    if latent.shape[-1] < 2:
        raise ValueError(f"latent must have >= 2 frames (one hop of samples), got {latent.shape[-1]}")
    if not torch.isfinite(latent).all():
        raise ValueError("latent must be finite (it holds NaN or inf: a diverged model?)")
    librosa = _librosa()
    db = (latent[0].detach().cpu().double().clamp(-1, 1).numpy() - 1) * (TOP_DB / 2)
    power = librosa.db_to_power(db) * REF_POWER
    magnitude = librosa.feature.inverse.mel_to_stft(power, power=2.0, **_mel_kwargs())
    y = librosa.griffinlim(
        magnitude, n_iter=n_iter, hop_length=HOP, n_fft=N_FFT, length=samples_for(latent.shape[-1]), random_state=seed
    )
    return y.astype(np.float32)


def _envelope(n: int, decay: float | None = None) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    fade = min(int(_FADE_S * SAMPLE_RATE), n // 2)
    env = np.ones(n)
    env[:fade] = np.linspace(0, 1, fade, endpoint=False)
    env[n - fade :] = np.linspace(1, 0, fade)
    return env * (np.exp(-t / decay) if decay else 1.0)


def synthesize(sound: str, register: str, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A waveform of ``samples_for(frames)`` samples: ``sound`` (one of SOUNDS) in ``register`` (low/high)."""
    n = samples_for(frames)
    t = np.arange(n) / SAMPLE_RATE
    lo, hi = REGISTERS[register]
    amplitude = rng.uniform(0.3, 0.6)
    if sound == "noise":
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        band = (freqs < 2 * hi) if register == "low" else (freqs > 2 * lo)
        y = np.fft.irfft(spectrum * band, n)
        return (amplitude * y / np.abs(y).max() * _envelope(n, decay=rng.uniform(0.1, 0.3))).astype(np.float32)
    f0 = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if sound in ("rising", "falling"):
        octaves = rng.uniform(0.6, 1.0)
        start = f0 / 2 ** (octaves / 2) if sound == "rising" else f0 * 2 ** (octaves / 2)
        rate = (octaves if sound == "rising" else -octaves) * math.log(2) / t[-1]
        phase = 2 * math.pi * start * np.expm1(rate * t) / rate  # integral of start * exp(rate * t)
        y = np.sin(phase)
    elif sound in ("major", "minor"):
        third = 4 if sound == "major" else 3
        y = sum(np.sin(2 * math.pi * f0 * 2 ** (k / 12) * t + rng.uniform(0, 2 * math.pi)) for k in (0, third, 7)) / 3
    else:
        y = np.sin(2 * math.pi * f0 * t + rng.uniform(0, 2 * math.pi))
    return (amplitude * y * _envelope(n)).astype(np.float32)


def caption(sound: str, register: str) -> str:
    if sound == "tone":
        return f"a {register} tone"
    if sound in ("rising", "falling"):
        return f"a {sound} {register} tone"
    if sound == "noise":
        return f"a {register} noise burst"
    return f"a {register} {sound} chord"


def make_audio(g: torch.Generator, frames: int | None = None) -> Item:
    """A clip of a random sound; ``frames`` (default: one of FRAME_CHOICES) sets its duration."""
    sound = SOUNDS[int(torch.randint(len(SOUNDS), (1,), generator=g))]
    register = ("low", "high")[int(torch.randint(2, (1,), generator=g))]
    if frames is None:
        frames = FRAME_CHOICES[int(torch.randint(len(FRAME_CHOICES), (1,), generator=g))]
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g)))
    return Item(waveform_to_latent(synthesize(sound, register, frames, rng)), caption(sound, register), "audio")


def write_wav(path: str | Path | io.BytesIO, waveform: np.ndarray) -> None:
    """16-bit PCM WAV at :data:`SAMPLE_RATE`: ``(samples,)`` mono or ``(channels, samples)`` with up to
    :data:`MAX_WAV_CHANNELS` channels (interleaved in the file); float samples are clipped to [-1, 1]."""
    y = np.asarray(waveform.detach().cpu() if isinstance(waveform, torch.Tensor) else waveform)
    if np.iscomplexobj(y) or not np.issubdtype(y.dtype, np.floating):
        raise TypeError(f"waveform must hold float amplitudes, got dtype {y.dtype}")
    if y.ndim == 1:
        y = y[None]
    if y.ndim != 2 or not 1 <= y.shape[0] <= MAX_WAV_CHANNELS:
        raise ValueError(
            f"waveform must be (samples,) or (channels, samples) with 1 to {MAX_WAV_CHANNELS} channels, got shape "
            f"{y.shape} (transpose a (samples, channels) array)"
        )
    if np.isnan(y).any():
        raise ValueError("waveform holds NaN samples")
    pcm = (np.clip(y, -1.0, 1.0) * 32767).round().astype("<i2").T  # frames of interleaved channels
    with wave.open(str(path) if isinstance(path, Path) else path, "wb") as f:
        f.setnchannels(y.shape[0])
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(pcm.tobytes())
