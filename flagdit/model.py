"""The thin Flag-DiT: Lumina-T2X's DiT_Llama (variant "flag") and Lumina-Next's NextDiT (variant "next") on
the packed-token ops of ``flagdit_kernels``.

A batch of latents of any ``(C, [F,] H, W)`` is packed once into one token sequence (``fk.pack``: patch rows
closed by [nextline], frames separated by [nextframe]); every block runs on that ``(T, dim)`` tensor with
``cu_seqlens`` (no padding, no masks); the final layer's tokens are unpacked back into latents. With an
attention tile the pack is tile-major instead (each 3-D tile of patches a contiguous run of tokens, for
tile-sparse attention); every op but attention is token-local and the RoPE positions are the raster ones, so
the order changes nothing else. Parameter names
and shapes follow Lumina-T2X so its state_dicts load, and the math follows its forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import flagdit_kernels as fk
from flagdit_kernels.nn import (
    GatedResidualRMSNorm,
    GatedVarlenAttention,
    ModulatedLayerNorm,
    ModulatedRMSNorm,
    RMSNorm,
)

from .configs import FlagDiTConfig, get_config
from .modality import ModalityConditioning, fit_channels, narrow_channels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` with ``f = max_period^(-i/half)`` (GLIDE / Lumina)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(256) -> Linear -> SiLU -> Linear (``t_embedder.mlp.{0,2}``)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        for lin in (self.w1, self.w2, self.w3):
            nn.init.xavier_uniform_(lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    lin = nn.Linear(n_in, n_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


@dataclass
class TokenLayout:
    """What every block needs to know about the packed image tokens of one forward call."""

    seqs: fk.VarlenLayout  # offsets, max_seqlen and the sample of every token, validated once per forward
    freqs: torch.Tensor  # float32 (T, head_dim/2, 2)
    softmax_scale: float | None
    tiles: fk.TileLayout | None = None  # the tiles of a tile-major pack (FlagDiT.attention_tile)
    sparsity: fk.TileSparsity | None = None  # tile-sparse self-attention over those tiles; None: dense


@dataclass
class TextContext:
    """Caption conditioning of one batch, reusable across sampling steps (the caption does not change).

    ``cap_emb`` ``(B, adaln_dim)`` is the embedded masked-mean caption; ``y`` ``(Tt, cap_feat_dim)`` the valid
    caption tokens packed as ``seqs`` says; ``kv[i]``, when cached, the text keys/values of block i
    (``(Tt, Hkv, Dh)`` each), else None and block i computes them in its forward (as it must under FSDP,
    where a block's weights exist only inside its forward).
    """

    cap_emb: torch.Tensor
    y: torch.Tensor
    seqs: fk.VarlenLayout
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]

    @property
    def batch_size(self) -> int:
        return self.cap_emb.shape[0]


@dataclass
class ModelInputs:
    """One forward call's inputs, packed: what :meth:`FlagDiT.transform` and :meth:`FlagDiT.unpack_output` need."""

    packed: fk.Packed
    layout: TokenLayout
    text: TextContext
    adaln_input: torch.Tensor  # (B, adaln_dim): timestep embedding + pooled caption
    as_tensor: bool  # x was one (B, C, H, W) tensor: the output is one too
    channels: list[int]  # each latent's own channel count (fit_channels)
    modality: list[str | int] | torch.Tensor | None = None
    cameras: list[torch.Tensor | None] | None = None


# Activation checkpointing (FlagDiT(checkpointing=...)): what a block keeps for its backward.
CHECKPOINTING = ("none", "block", "selective")
# The attention tile of FlagDiT(attention_sparsity=...) when none is given: 4 frames x 4 x 4 patches, 64 tokens,
# one key block of the attention kernels.
DEFAULT_ATTENTION_TILE = (4, 4, 4)


class TransformerBlock(nn.Module):
    """One Flag-DiT block (shift/scale/gate adaLN) or Next-DiT block (scale-only, tanh gates, sandwich norms)."""

    def __init__(self, config: FlagDiTConfig, backend: str | None = None, checkpointing: str = "none"):
        super().__init__()
        c = config
        self.variant = c.variant
        self.checkpointing = checkpointing  # one of CHECKPOINTING, checked by FlagDiT
        self.attention = GatedVarlenAttention(
            c.dim, c.n_heads, c.n_kv_heads, qk_norm=c.qk_norm, y_dim=c.cap_feat_dim, backend=backend,
            coarse=c.coarse_attention,
        )  # fmt: skip
        for name in ("wq", "wk", "wv", "wo", "wk_y", "wv_y"):
            nn.init.xavier_uniform_(getattr(self.attention, name).weight)
        self.feed_forward = FeedForward(c.dim, c.ffn_dim)
        # The norms are the fused modules the forward calls (Lumina-T2X's parameter names: a `weight` each).
        if self.variant == "flag":
            self.attention_norm = ModulatedRMSNorm(c.dim, eps=c.norm_eps, backend=backend)
            self.ffn_norm = ModulatedRMSNorm(c.dim, eps=c.norm_eps, backend=backend)
            n_mod = 6
        else:
            self.attention_norm1 = ModulatedRMSNorm(c.dim, eps=c.norm_eps, backend=backend)
            self.ffn_norm1 = ModulatedRMSNorm(c.dim, eps=c.norm_eps, backend=backend)
            self.attention_norm2 = GatedResidualRMSNorm(c.dim, eps=c.norm_eps, backend=backend)
            self.ffn_norm2 = GatedResidualRMSNorm(c.dim, eps=c.norm_eps, backend=backend)
            n_mod = 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_linear(c.adaln_dim, n_mod * c.dim))
        self.attention_y_norm = RMSNorm(c.cap_feat_dim, eps=c.norm_eps, backend=backend)

    def text_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's text keys/values for packed caption features y ``(Tt, cap_feat_dim)``."""
        return self.attention.text_kv(self.attention_y_norm(y))

    def forward(self, x, layout: TokenLayout, text: TextContext, kv, adaln_input: torch.Tensor) -> torch.Tensor:
        if self.checkpointing == "block":  # keeps x (and adaln_input); the backward runs _forward again
            return checkpoint(self._forward, x, layout, text, kv, adaln_input, use_reentrant=False)
        return self._forward(x, layout, text, kv, adaln_input)

    def _forward(self, x, layout: TokenLayout, text: TextContext, kv, adaln_input: torch.Tensor) -> torch.Tensor:
        if kv is None:
            kv = self.text_kv(text.y)
        mod = self.adaLN_modulation(adaln_input)
        # selective: the attention (q, k, v, its output and LSE) is kept; what comes before it (norm,
        # modulation, projections, QK norm, RoPE) and after it (wo, residuals, FFN) is recomputed.
        around = _recomputed if self.checkpointing == "selective" else _run
        q, k, v = around(self._qkv, x, mod, layout)
        out = self.attention.attend(
            q, k, v, layout.seqs, None, None, text.seqs, None, layout.softmax_scale, kv,
            sparsity=layout.sparsity, tiles=layout.tiles,
        )  # fmt: skip
        return around(self._finish, x, out, mod, layout)

    def _qkv(self, x: torch.Tensor, mod: torch.Tensor, layout: TokenLayout):
        """Attention norm and modulation, then the projections, QK norm and RoPE."""
        seqs = layout.seqs
        if self.variant == "flag":
            (shift, scale), norm = mod.chunk(6, dim=1)[:2], self.attention_norm
        else:
            shift, scale, norm = None, mod.chunk(4, dim=1)[0], self.attention_norm1
        h = norm(x, scale, shift, seqs)
        return self.attention.qkv(h, layout.freqs)

    def _finish(self, x: torch.Tensor, out: torch.Tensor, mod: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """wo, the gated residual, the FFN norm and modulation, the FFN and its gated residual."""
        seqs = layout.seqs
        sample = seqs.sample_index
        a = self.attention.wo(out.flatten(1))
        if self.variant == "flag":
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
            x = x + gate_msa[sample] * a
            h = self.ffn_norm(x, scale_mlp, shift_mlp, seqs)
            return x + gate_mlp[sample] * self.feed_forward(h)
        _, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
        x = self.attention_norm2(x, a, gate_msa, seqs)
        h = self.ffn_norm1(x, scale_mlp, None, seqs)
        return self.ffn_norm2(x, self.feed_forward(h), gate_mlp, seqs)


def _run(fn, *args):
    return fn(*args)


def _recomputed(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) -> modulate (shift+scale for Flag-DiT, scale for Next-DiT) -> Linear.

    The norm and the modulation are one fused ``fk.layer_norm_modulate`` (``norm_final`` has no parameters,
    as Lumina's ``nn.LayerNorm(elementwise_affine=False)`` has none: checkpoints load unchanged)."""

    def __init__(self, config: FlagDiTConfig, backend: str | None = None):
        super().__init__()
        c = config
        self.variant = c.variant
        self.norm_final = ModulatedLayerNorm(c.dim, eps=1e-6, backend=backend)
        self.linear = _zero_linear(c.dim, c.patch_size**2 * c.out_channels)
        n_mod = 2 if c.variant == "flag" else 1
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _zero_linear(c.adaln_dim, n_mod * c.dim))

    def forward(self, x: torch.Tensor, layout: TokenLayout, adaln_input: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(adaln_input)
        shift, scale = mod.chunk(2, dim=1) if self.variant == "flag" else (None, mod)
        return self.linear(self.norm_final(x, scale, shift, layout.seqs))


class FlagDiT(nn.Module):
    """Flow-based Large Diffusion Transformer over packed tokens of any modality and resolution.

    ``model(x, t, cap_feats, cap_mask)`` follows Lumina-T2X: x a list of ``(C, [F,] H, W)`` latents or a
    ``(B, C, H, W)`` tensor, t ``(B,)`` in [0, 1] (0 noise, 1 data), cap_feats ``(B, Lt, cap_feat_dim)``,
    cap_mask ``(B, Lt)``; returns the predicted velocity in the same structure with ``in_channels`` channels
    (the learned-sigma half is dropped). ``backend`` is the model's preference, passed to every
    ``flagdit_kernels`` op as ``prefer=`` (ops that implement it run it, the others their default); it is kept
    at this level (also settable later as the attribute) and handed to the modules below.

    ``checkpointing`` (activation checkpointing, ``torch.utils.checkpoint`` without reentrance, also settable
    later as the attribute): ``"none"`` keeps every activation for the backward; ``"block"`` keeps each block's
    input and runs the block again in the backward; ``"selective"`` keeps the attention's q, k, v, output and
    LSE and recomputes the norms, modulation, projections, RoPE and the FFN around it. Same results either way;
    sequence-parallel collectives inside a recomputed part run again, on every rank alike.

    ``attention_sparsity`` (a ``fk.TileSparsity``: ``window=`` Sliding Tile Attention, ``top_k=`` Video Sparse
    Attention's selection) makes the self-attention tile-sparse over 3-D tiles of ``attention_tile`` patches
    (frames, rows, cols; :data:`DEFAULT_ATTENTION_TILE` when None); placeholders stay global and the text branch
    dense. ``attention_tile`` alone packs tile-major with dense attention (the same outputs as raster order, up
    to float rounding). Neither changes a parameter, so both are also settable later as attributes: a dense
    checkpoint fine-tunes or samples sparse. The config's ``coarse_attention`` (a parameter per head and block,
    so a property of the weights) adds VSA's gated coarse branch to every block's attention and packs
    tile-major.
    """

    def __init__(
        self,
        config: FlagDiTConfig | str,
        backend: str | None = None,
        checkpointing: str = "none",
        attention_sparsity: fk.TileSparsity | None = None,
        attention_tile: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        self.config = c = get_config(config) if isinstance(config, str) else config
        c.validate()  # a config changed in place after construction is checked here
        self.backend = backend
        self.x_embedder = nn.Linear(c.patch_size**2 * c.in_channels, c.dim)
        nn.init.xavier_uniform_(self.x_embedder.weight)
        nn.init.zeros_(self.x_embedder.bias)
        self.t_embedder = TimestepEmbedder(c.adaln_dim)
        self.cap_embedder = nn.Sequential(nn.LayerNorm(c.cap_feat_dim), _zero_linear(c.cap_feat_dim, c.adaln_dim))
        self.layers = nn.ModuleList([TransformerBlock(c, backend) for _ in range(c.n_layers)])
        self.checkpointing = checkpointing
        self.attention_sparsity = attention_sparsity
        self.attention_tile = attention_tile
        self.final_layer = FinalLayer(c, backend)
        if c.nextline:
            self.eol_token = nn.Parameter(torch.randn(c.dim) * 0.02)
        if c.nextframe:
            self.eof_token = nn.Parameter(torch.randn(c.dim) * 0.02)
        # Lumina pads each sample to the batch's longest; packed tokens need no padding, but the parameter is
        # kept so that Lumina state_dicts load strictly and ours load in Lumina.
        self.pad_token = nn.Parameter(torch.randn(c.dim) * 0.02)
        # Any-modality conditioning (flagdit.modality), only in configs that ask for it.
        self.conditioning = None
        if c.n_modalities or c.camera_cond:
            self.conditioning = ModalityConditioning(c.n_modalities, c.camera_cond, c.dim, c.adaln_dim)

    @property
    def checkpointing(self) -> str:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, mode: str) -> None:
        if mode not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
        self._checkpointing = mode
        for layer in self.layers:
            layer.checkpointing = mode

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, backend: str | None) -> None:
        """The model's one backend preference: set here (at construction or later), it reaches every module
        below that passes ``prefer=`` to an op (the ``flagdit_kernels.nn`` modules, the blocks), so no level
        keeps a preference of its own."""
        if backend is not None and backend not in fk.BACKENDS:
            raise ValueError(f"backend must be one of {fk.BACKENDS} or None, got {backend!r}")
        self._backend = backend
        for module in self.modules():
            if module is not self and hasattr(module, "backend"):
                module.backend = backend

    def conditioning_inputs(
        self, modality: list[str], cameras: list[torch.Tensor | None], device: torch.device | str | None = None
    ) -> dict:
        """The ``modality`` / ``cameras`` keywords of :meth:`forward` that this model takes, from what a data set
        gives for every item (a modality name, a camera table or None): the names when the config has
        ``n_modalities``, the cameras (on ``device``, by default the model's) when it has ``camera_cond`` and
        some item has one. Trainers and samplers pass the result on as it is."""
        c, kwargs = self.config, {}
        if c.n_modalities:
            kwargs["modality"] = modality
        if c.camera_cond and any(cam is not None for cam in cameras):
            device = self.x_embedder.weight.device if device is None else device
            kwargs["cameras"] = [None if cam is None else cam.to(device) for cam in cameras]
        return kwargs

    @property
    def attention_sparsity(self) -> fk.TileSparsity | None:
        return self._attention_sparsity

    @attention_sparsity.setter
    def attention_sparsity(self, sparsity: fk.TileSparsity | None) -> None:
        if sparsity is not None and not isinstance(sparsity, fk.TileSparsity):
            raise TypeError(
                f"attention_sparsity must be None or a fk.TileSparsity(window=..., top_k=...), got {sparsity!r}"
            )
        self._attention_sparsity = sparsity

    @property
    def attention_tile(self) -> tuple[int, int, int] | None:
        return self._attention_tile

    @attention_tile.setter
    def attention_tile(self, tile: tuple[int, int, int] | None) -> None:
        if tile is not None:
            bad = not isinstance(tile, (tuple, list)) or len(tile) != 3
            if bad or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in tile):
                raise ValueError(f"attention_tile must be None or (frames, rows, cols) of patches >= 1, got {tile!r}")
            tile = tuple(tile)
        self._attention_tile = tile

    @property
    def pack_tile(self) -> tuple[int, int, int] | None:
        """The tile the latents are packed by: ``attention_tile``, its default under sparsity or with the config's
        ``coarse_attention`` (which needs tiles), None for raster."""
        if self.attention_tile is None and (self.attention_sparsity is not None or self.config.coarse_attention):
            return DEFAULT_ATTENTION_TILE
        return self.attention_tile

    # ---- inputs -----------------------------------------------------------------------------------------

    def encode_text(self, cap_feats: torch.Tensor, cap_mask: torch.Tensor, cache_kv: bool = False) -> TextContext:
        """Pools and embeds the caption; with ``cache_kv`` also computes every block's text keys/values now, so
        that a sampler reuses them for all its steps.

        A sample whose mask is all zero gets a zero pooled caption (Lumina divides 0 by 0) and no text
        cross-attention term.
        """
        if cap_feats.dim() != 3 or cap_feats.shape[-1] != self.config.cap_feat_dim:
            raise ValueError(f"cap_feats must be (B, Lt, {self.config.cap_feat_dim}), got {tuple(cap_feats.shape)}")
        if cap_mask.shape != cap_feats.shape[:2]:
            raise ValueError(f"cap_mask must be {tuple(cap_feats.shape[:2])}, got {tuple(cap_mask.shape)}")
        dtype = self.x_embedder.weight.dtype
        mask = cap_mask.bool()
        maskf = mask.float().unsqueeze(-1)
        pooled = (cap_feats * maskf).sum(dim=1) / maskf.sum(dim=1).clamp(min=1)
        cap_emb = self.cap_embedder(pooled.to(dtype))
        counts = mask.sum(dim=1)
        cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        y = cap_feats[mask].to(dtype)  # (Tt, cap_feat_dim), sample-major
        seqs = fk.VarlenLayout.from_cu_seqlens(cu, y.shape[0], int(counts.max()) if counts.numel() else 0)
        kv = [layer.text_kv(y) if cache_kv else None for layer in self.layers]
        return TextContext(cap_emb, y, seqs, kv)

    def embed_tokens(self, patches: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """Patch embedding of packed rows (``patches`` ``(N, C*p*p)``, ``kind`` ``(N,)``), with the learned
        [nextline]/[nextframe] embeddings at their slots."""
        weight = self.x_embedder.weight
        dim, dtype = weight.shape[0], weight.dtype
        # A layout without [nextline] / [nextframe] slots has no such parameter and never reads that row.
        table = torch.stack(
            [
                self.eol_token if self.config.nextline else weight.new_zeros(dim),
                self.eof_token if self.config.nextframe else weight.new_zeros(dim),
            ]
        ).to(dtype)
        x = fk.embed_packed(patches.to(dtype), kind, weight, self.x_embedder.bias, table, prefer=self.backend)
        return x.to(dtype)  # under autocast the Linear computes in bf16; the residual stream stays in dtype

    def rope(self, packed: fk.Packed, sample: torch.Tensor, linear_factor: float, ntk_factor: float) -> torch.Tensor:
        """Flag-DiT: 1D RoPE over the token's index in its sample in raster order (placeholders included, as
        Lumina-T2X), whatever order the pack has. Next-DiT: 2D RoPE over (row, col), frames stacked vertically
        with a one-row gap."""
        c = self.config
        kw = dict(theta=c.rope_theta, linear_factor=linear_factor, ntk_factor=ntk_factor, prefer=self.backend)
        pos = packed.positions.long()
        if c.variant == "flag":
            # The raster index from the (frame, row, col) position: a frame is hp rows of wp (+ [nextline]) tokens
            # (+ its [nextframe]), which sits at (frame, hp, 0); a tile-major pack keeps the raster positions.
            row_len = [s[-1] // c.patch_size + packed.nextline for s in packed.shapes]
            frame_len = [(s[-2] // c.patch_size) * n + packed.nextframe for s, n in zip(packed.shapes, row_len)]
            strides = torch.tensor([frame_len, row_len], dtype=torch.long).to(sample.device, non_blocking=True)
            index = pos[:, 0] * strides[0][sample] + pos[:, 1] * strides[1][sample] + pos[:, 2]
            return fk.rope_freqs(c.head_dim, index, **kw)
        rows_per_frame = torch.tensor(
            [s[-2] // c.patch_size + 1 for s in packed.shapes], device=sample.device, dtype=torch.long
        )[sample]
        row = pos[:, 0] * rows_per_frame + pos[:, 1]
        return fk.rope_freqs(c.head_dim, torch.stack([row, pos[:, 2]], dim=-1), **kw)

    def layout(
        self,
        packed: fk.Packed,
        base_seqlen: int | None = None,
        linear_factor: float | None = None,
        ntk_factor: float | None = None,
    ) -> TokenLayout:
        c = self.config
        seqs = fk.VarlenLayout.from_cu_seqlens(
            packed.cu_seqlens, packed.kind.shape[0], packed.max_seqlen, packed.positions
        )
        freqs = self.rope(
            packed,
            seqs.sample_index,
            c.rope_linear_factor if linear_factor is None else linear_factor,
            c.rope_ntk_factor if ntk_factor is None else ntk_factor,
        )
        base = c.base_seqlen if base_seqlen is None else base_seqlen
        # Proportional attention uses the batch's longest sequence, as Lumina uses its padded length.
        scale = fk.proportional_scale(packed.max_seqlen, base, c.head_dim) if base else None
        return TokenLayout(seqs, freqs, scale, packed.tiles, self.attention_sparsity)

    # ---- forward ----------------------------------------------------------------------------------------

    def forward(
        self,
        x: list[torch.Tensor] | torch.Tensor,
        t: torch.Tensor,
        cap_feats: torch.Tensor | None = None,
        cap_mask: torch.Tensor | None = None,
        **options,
    ):
        """Velocity prediction (see class docstring). ``options`` are :meth:`prepare`'s keywords: ``text`` (from
        :meth:`encode_text`) replaces cap_feats/cap_mask; ``base_seqlen`` turns on proportional attention;
        ``linear_factor`` / ``ntk_factor`` override the config's RoPE extrapolation factors; ``modality`` (one
        name of ``flagdit.modality.MODALITIES`` per sample) and ``cameras`` (per sample a ``(F, 2)``
        azimuth/elevation table or None) need a config with ``n_modalities`` / ``camera_cond`` (see
        :mod:`flagdit.modality`). Latents may have fewer than ``in_channels`` channels (zero-padded inside, each
        output cut back to its latent's channels).

        The steps are public (:meth:`prepare`, :meth:`embed_rows`, :meth:`transform`, :meth:`unpack_output`) so
        that a runner can compose them differently: ``flagdit.parallel`` runs the middle two on each rank's
        share of the tokens."""
        inputs = self.prepare(x, t, cap_feats, cap_mask, **options)
        h, adaln_input = self.embed_rows(inputs)
        return self.unpack_output(self.transform(h, inputs.layout, inputs.text, adaln_input), inputs)

    def prepare(
        self,
        x: list[torch.Tensor] | torch.Tensor,
        t: torch.Tensor,
        cap_feats: torch.Tensor | None = None,
        cap_mask: torch.Tensor | None = None,
        *,
        text: TextContext | None = None,
        base_seqlen: int | None = None,
        linear_factor: float | None = None,
        ntk_factor: float | None = None,
        modality: list[str | int] | torch.Tensor | None = None,
        cameras: list[torch.Tensor | None] | None = None,
    ) -> ModelInputs:
        """Checks the inputs, encodes the caption (unless ``text`` is given), packs the latents and builds the
        token layout: everything the token pipeline needs, per batch (:meth:`forward` describes the arguments)."""
        c = self.config
        as_tensor = isinstance(x, torch.Tensor)
        latents = list(x.unbind(0)) if as_tensor else list(x)
        latents, channels = fit_channels(latents, c.in_channels)
        if text is None:
            if cap_feats is None or cap_mask is None:
                raise ValueError("give cap_feats and cap_mask, or a TextContext as text=")
            text = self.encode_text(cap_feats, cap_mask)
        if text.batch_size != len(latents) or t.shape != (len(latents),):
            raise ValueError(
                f"batch mismatch: {len(latents)} latents, t of shape {tuple(t.shape)}, {text.batch_size} captions"
            )
        if self.conditioning is None and (modality is not None or cameras is not None):
            raise ValueError("modality / cameras given, but this config has n_modalities=0 and camera_cond=False")
        packed = fk.pack(latents, c.patch_size, c.nextline, c.nextframe, tile=self.pack_tile, prefer=self.backend)
        layout = self.layout(packed, base_seqlen, linear_factor, ntk_factor)
        adaln_input = self.t_embedder(t) + text.cap_emb
        return ModelInputs(packed, layout, text, adaln_input, as_tensor, channels, modality, cameras)

    def embed_rows(self, inputs: ModelInputs, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedded tokens of the packed rows ``rows`` (all when None), with the modality / camera
        conditioning of their samples, and the adaLN input (the modality embedding added). Each row is embedded
        alone, so a rank of a sequence-parallel group embeds only the rows it holds."""
        packed = inputs.packed
        patches, kind = packed.patches, packed.kind
        if rows is not None:
            patches, kind = patches.index_select(0, rows), kind.index_select(0, rows)
        h, adaln_input = self.embed_tokens(patches, kind), inputs.adaln_input
        if self.conditioning is not None:
            frame = packed.positions[:, 0]
            adaln_input, h = self.conditioning(
                adaln_input, h, packed.cu_seqlens, frame, packed.shapes, inputs.modality, inputs.cameras, rows
            )
        return h, adaln_input

    def transform(
        self, h: torch.Tensor, layout: TokenLayout, text: TextContext, adaln_input: torch.Tensor
    ) -> torch.Tensor:
        """The blocks and the final layer over embedded tokens h ``(N, dim)`` laid out as ``layout`` says;
        returns ``(N, p*p*out_channels)``. Every op but attention is token-local."""
        for layer, kv in zip(self.layers, text.kv):
            h = layer(h, layout, text, kv, adaln_input)
        return self.final_layer(h, layout, adaln_input)

    def unpack_output(self, h: torch.Tensor, inputs: ModelInputs):
        """The final layer's tokens of the whole batch back into latents (the learned-sigma half dropped, each
        cut back to its latent's channels)."""
        c = self.config
        out = fk.unpack(h, inputs.packed, c.out_channels, prefer=self.backend)
        if c.learn_sigma:
            out = [o[: c.in_channels] for o in out]
        out = narrow_channels(out, inputs.channels)
        return torch.stack(out) if inputs.as_tensor else out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
