"""How one Flag-DiT takes every modality: a shared latent width, a modality embedding, camera embeddings.

- **Channels.** Every modality is a ``(C, [F,] H, W)`` latent packed into one token sequence; the model has one
  patch embedding and one final layer of ``in_channels`` (its shared latent width). A latent with fewer
  channels (a 1-channel spectrogram beside 3-channel images) is zero-padded up to that width before packing
  (:func:`fit_channels`) and its prediction cut back to its own channels after unpacking
  (:func:`narrow_channels`), so the padded channels carry no signal in and no loss out, and items of
  different channel counts share one packed batch and one set of kernels.
- **Which modality.** With ``n_modalities > 0`` a learned vector per modality (zero-initialised) is added to the
  adaLN conditioning (timestep + pooled caption) of each sample, next to the caption that already names it.
- **Cameras.** With ``camera_cond`` each multi-view sample's ``(V, 2)`` (azimuth, elevation) table is embedded
  per view (Fourier features of the angles -> MLP, last layer zero-initialised) and the view's vector is added
  to every token of that frame (its patches, [nextline]s and the [nextframe] after it) before the first block.
  Lumina-T2X's multi-view model conditions on the camera the same way, per frame; the 1D / 2D RoPE of the
  token grid is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

MODALITIES = ("image", "video", "multiview", "audio")
CAMERA_HARMONICS = 4  # azimuth features sin/cos(k * azimuth) for k = 1..4, plus sin/cos(elevation)
CAMERA_FEATURES = 2 * CAMERA_HARMONICS + 2


def fit_channels(latents: Sequence[torch.Tensor], channels: int) -> tuple[list[torch.Tensor], list[int]]:
    """Latents zero-padded along dim 0 to ``channels``, and each one's own channel count."""
    own = [int(x.shape[0]) for x in latents]
    for i, c in enumerate(own):
        if not 1 <= c <= channels:
            raise ValueError(f"latent {i} has {c} channels; this model takes 1 to {channels} (in_channels)")
    padded = [
        x if c == channels else torch.cat([x, x.new_zeros(channels - c, *x.shape[1:])]) for x, c in zip(latents, own)
    ]
    return padded, own


def narrow_channels(outputs: Sequence[torch.Tensor], channels: Sequence[int]) -> list[torch.Tensor]:
    return [o if o.shape[0] == c else o[:c] for o, c in zip(outputs, channels)]


def modality_index(modality: Sequence[str | int] | torch.Tensor, batch: int, count: int, device) -> torch.Tensor:
    """int64 ``(batch,)`` indices (< ``count``) from MODALITIES names, ints, or a tensor of ints."""
    if isinstance(modality, str):
        raise TypeError(f"modality must have one entry per sample (a list), got the string {modality!r}")
    if isinstance(modality, torch.Tensor):
        index = modality.to(device=device, dtype=torch.long).reshape(-1)
        host = index if index.device.type == "cpu" else None  # GPU values are not read back (no sync)
    else:
        ids = []
        for m in modality:
            if isinstance(m, str) and m not in MODALITIES:
                raise ValueError(f"modality must name one of {MODALITIES}, got {m!r}")
            ids.append(MODALITIES.index(m) if isinstance(m, str) else int(m))
        host = index = torch.tensor(ids, dtype=torch.long)
        index = index.to(device)
    if index.shape != (batch,):
        raise ValueError(f"modality must have one entry per sample ({batch}), got {tuple(index.shape)}")
    if host is not None and batch and not (int(host.min()) >= 0 and int(host.max()) < count):
        raise ValueError(f"modality indices must be in [0, {count}) (config n_modalities), got {host.tolist()}")
    return index


def camera_features(cameras: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` (azimuth, elevation) radians -> ``(N, CAMERA_FEATURES)`` Fourier features."""
    azimuth, elevation = cameras[:, :1], cameras[:, 1:]
    k = torch.arange(1, CAMERA_HARMONICS + 1, device=cameras.device, dtype=cameras.dtype)
    return torch.cat([torch.sin(k * azimuth), torch.cos(k * azimuth), torch.sin(elevation), torch.cos(elevation)], -1)


def _frames(shape: Sequence[int]) -> int:
    return int(shape[1]) if len(shape) == 4 else 1


class ModalityConditioning(nn.Module):
    """The modality embedding and the per-view camera embedder of a :class:`flagdit.FlagDiT` (module doc)."""

    def __init__(self, n_modalities: int, camera_cond: bool, dim: int, adaln_dim: int):
        super().__init__()
        self.modality_embedding = nn.Embedding(n_modalities, adaln_dim) if n_modalities else None
        if self.modality_embedding is not None:
            nn.init.zeros_(self.modality_embedding.weight)
        self.camera_embedder = None
        if camera_cond:
            last = nn.Linear(dim, dim)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.camera_embedder = nn.Sequential(nn.Linear(CAMERA_FEATURES, dim), nn.SiLU(), last)

    def forward(
        self,
        adaln_input: torch.Tensor,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        frame: torch.Tensor,
        shapes: Sequence[Sequence[int]],
        modality: Sequence[str | int] | torch.Tensor | None,
        cameras: Sequence[torch.Tensor | None] | None,
        token_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``adaln_input`` ``(B, adaln_dim)`` and packed ``tokens`` ``(T, dim)`` with the conditioning added.

        ``frame`` is each token's frame (``Packed.positions[:, 0]``); ``modality`` one name or index per sample
        (None: no modality vector); ``cameras`` one ``(F, 2)`` table or None per sample (None: no camera).
        ``token_rows``: the packed rows ``tokens`` holds when not all (a sequence-parallel rank's share).
        """
        batch = adaln_input.shape[0]
        if modality is not None:
            if self.modality_embedding is None:
                raise ValueError("modality given, but this model has no modality embedding (config n_modalities=0)")
            index = modality_index(modality, batch, self.modality_embedding.num_embeddings, adaln_input.device)
            adaln_input = adaln_input + self.modality_embedding(index).to(adaln_input.dtype)
        if cameras is not None and any(c is not None for c in cameras):
            if self.camera_embedder is None:
                raise ValueError("cameras given, but this model has no camera embedder (config camera_cond=False)")
            tokens = tokens + self._camera_tokens(tokens, cu_seqlens, frame, shapes, cameras, token_rows)
        return adaln_input, tokens

    def _camera_tokens(self, tokens, cu_seqlens, frame, shapes, cameras, token_rows) -> torch.Tensor:
        if len(cameras) != len(shapes):
            raise ValueError(f"cameras must have one entry per sample ({len(shapes)}), got {len(cameras)}")
        rows, first = [], []
        for i, (cam, shape) in enumerate(zip(cameras, shapes)):
            if cam is None:
                first.append(-1)
                continue
            if cam.dim() != 2 or cam.shape != (_frames(shape), 2):
                raise ValueError(
                    f"cameras[{i}] must be ({_frames(shape)}, 2) (azimuth, elevation) for a latent of shape "
                    f"{tuple(shape)}, got {tuple(cam.shape)}"
                )
            first.append(sum(r.shape[0] for r in rows))
            rows.append(cam)
        weight = self.camera_embedder[0].weight
        table = self.camera_embedder(camera_features(torch.cat(rows).to(weight.device, weight.dtype)))
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])  # last row: samples without cameras
        sample = torch.repeat_interleave(
            torch.arange(len(shapes), device=tokens.device),
            (cu_seqlens[1:] - cu_seqlens[:-1]).long(),
            output_size=frame.shape[0],
        )
        start = torch.tensor(first, device=tokens.device)[sample]
        index = torch.where(start < 0, table.shape[0] - 1, start + frame.long())
        if token_rows is not None:
            index = index.index_select(0, token_rows)
        return table[index].to(tokens.dtype)
