"""Drop-in modules over the fused ops, with Lumina-T2X / diffusers / apex parameter names.

A module's ``backend`` is a preference, passed to every op as ``prefer=``: an op that implements that backend
runs it (and raises when it cannot run the inputs), an op without it runs its default (see
``flagdit_kernels._dispatch``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._conventions import EPS, LAYER_NORM_EPS, QK_NORM_EPS
from ._layout import VarlenLayout
from .ops.attention import varlen_attention
from .ops.coarse_attention import tile_coarse_attention
from .ops.norms import gated_residual_rms_norm, layer_norm_modulate, rms_norm, rms_norm_modulate
from .ops.rope import qk_norm_rope
from .ops.tile_sparsity import TileLayout, TileSparsity


class RMSNorm(nn.Module):
    """RMSNorm with a ``weight`` parameter (Lumina-T2X ``RMSNorm``, apex ``FusedRMSNorm``, diffusers names)."""

    def __init__(self, dim: int, eps: float = EPS, elementwise_affine: bool = True, backend: str | None = None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, prefer=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0] if self.weight is not None else 'no affine'}, eps={self.eps}"


class ModulatedRMSNorm(RMSNorm):
    """``rms_norm(x) * (1 + scale) + shift`` with per-sample scale/shift (adaLN), one fused pass."""

    def forward(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | VarlenLayout | None = None,
    ) -> torch.Tensor:
        return rms_norm_modulate(x, self.weight, scale, shift, self.eps, cu_seqlens, prefer=self.backend)


class GatedResidualRMSNorm(RMSNorm):
    """``residual + act(gate) * rms_norm(h)`` with a per-sample gate (Next-DiT's sandwich norm), one fused pass;
    act is tanh (``tanh_gate``) or the identity."""

    def __init__(self, dim: int, eps: float = EPS, tanh_gate: bool = True, backend: str | None = None):
        super().__init__(dim, eps, backend=backend)
        self.tanh_gate = tanh_gate

    def forward(
        self,
        residual: torch.Tensor,
        h: torch.Tensor,
        gate: torch.Tensor,
        cu_seqlens: torch.Tensor | VarlenLayout | None = None,
    ) -> torch.Tensor:
        return gated_residual_rms_norm(
            residual, h, self.weight, gate, self.eps, self.tanh_gate, cu_seqlens, prefer=self.backend
        )


class ModulatedLayerNorm(nn.Module):
    """``LayerNorm(x) * (1 + scale) + shift`` with per-sample scale/shift (adaLN-LayerNorm), one fused pass.

    ``nn.LayerNorm``'s ``weight`` / ``bias`` names when ``elementwise_affine``; DiT final layers use none.
    """

    def __init__(
        self, dim: int, eps: float = LAYER_NORM_EPS, elementwise_affine: bool = False, backend: str | None = None
    ):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None
        self.dim = dim

    def forward(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | VarlenLayout | None = None,
    ) -> torch.Tensor:
        return layer_norm_modulate(x, scale, shift, self.weight, self.bias, self.eps, cu_seqlens, prefer=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class QKNormRoPE(nn.Module):
    """QK-norm + RoPE for q ``(..., H, Dh)`` and k ``(..., Hkv, Dh)``; ``q_norm`` / ``k_norm`` submodules.

    ``norm="layer_norm"``: LayerNorm over H*Dh (Flag-DiT, Lumina-Next); ``"rms_norm"``: per-head RMSNorm
    (Lumina-Image-2.0); ``None``: RoPE only.
    """

    def __init__(
        self,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        norm: str | None = "layer_norm",
        eps: float = QK_NORM_EPS,
        interleaved: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        self.norm, self.eps, self.interleaved, self.backend = norm, eps, interleaved, backend
        if norm == "layer_norm":
            self.q_norm = nn.LayerNorm(n_heads * head_dim, eps=eps)
            self.k_norm = nn.LayerNorm(n_kv_heads * head_dim, eps=eps)
        elif norm == "rms_norm":
            self.q_norm = RMSNorm(head_dim, eps=eps)
            self.k_norm = RMSNorm(head_dim, eps=eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return qk_norm_rope(
            q,
            k,
            freqs,
            self.q_norm,
            self.k_norm,
            self.norm,
            self.eps,
            self.interleaved,
            prefer=self.backend,
        )


class GatedVarlenAttention(nn.Module):
    """Lumina-T2X attention over packed tokens: wq/wk/wv/wo, QK LayerNorm, RoPE, and (with ``y_dim``) the
    zero-initialized tanh-gated text cross-attention (``wk_y``, ``wv_y``, ``ky_norm``, ``gate``).

    Parameter names and shapes follow Lumina-T2X's ``Attention`` so its state_dicts load strictly.
    ``coarse=True`` adds Video Sparse Attention's coarse branch for tile-major packs: ``tanh(coarse_gate[h])``
    (zero-initialized, like the text gate) times ``fk.tile_coarse_attention``, added to the output of every
    call given ``tiles``; a call without tiles (a raster pack) has no tiles to pool and adds nothing.
    ``core`` is the attention over the projected, normalized and rotated q/k/v, called like
    ``fk.varlen_attention``; an instance may replace it (``flagdit.parallel`` puts a sequence-parallel one there,
    which takes a sharded layout as ``cu_seqlens``) without touching the projections or the parameters.
    """

    core = staticmethod(varlen_attention)

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        qk_norm: bool = True,
        y_dim: int = 0,
        backend: str | None = None,
        coarse: bool = False,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.backend = backend
        q_width, kv_width = n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(dim, q_width, bias=False)
        self.wk = nn.Linear(dim, kv_width, bias=False)
        self.wv = nn.Linear(dim, kv_width, bias=False)
        self.y_dim = y_dim
        if y_dim > 0:
            self.wk_y = nn.Linear(y_dim, kv_width, bias=False)
            self.wv_y = nn.Linear(y_dim, kv_width, bias=False)
            self.gate = nn.Parameter(torch.zeros(n_heads))
        self.wo = nn.Linear(q_width, dim, bias=False)
        self.coarse_gate = nn.Parameter(torch.zeros(n_heads)) if coarse else None
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = nn.LayerNorm(q_width)
            self.k_norm = nn.LayerNorm(kv_width)
            if y_dim > 0:
                self.ky_norm = nn.LayerNorm(kv_width)

    def text_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys ``ky_norm(wk_y(y))`` and values ``wv_y(y)`` as ``(Tt, Hkv, Dh)``; y ``(Tt, y_dim)`` is the
        normalized caption. They depend on the caption only, so a sampler computes them once for all steps."""
        if self.y_dim <= 0:
            raise ValueError("this attention has no text cross-attention (y_dim=0)")
        ky = self.wk_y(y)
        if self.qk_norm:
            ky = self.ky_norm(ky)
        return ky.view(-1, self.n_kv_heads, self.head_dim), self.wv_y(y).view(-1, self.n_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: torch.Tensor | VarlenLayout,
        max_seqlen: int | None,
        freqs: torch.Tensor,
        y: torch.Tensor | None = None,
        y_cu_seqlens: torch.Tensor | VarlenLayout | None = None,
        y_max_seqlen: int | None = None,
        softmax_scale: float | None = None,
        text_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x ``(T, dim)`` packed by ``cu_seqlens``; y ``(Tt, y_dim)`` caption features packed by ``y_cu_seqlens``,
        or ``text_kv`` = :meth:`text_kv` of them computed earlier (same ``y_cu_seqlens``). Offsets may be
        :class:`~flagdit_kernels.VarlenLayout` objects (then the max_seqlens may be None).

        The three steps are public (:meth:`qkv`, :meth:`attend`, then ``wo``) so that a caller can treat them
        differently, e.g. recompute the projections in the backward but keep the attention's output."""
        q, k, v = self.qkv(x, freqs)
        out = self.attend(q, k, v, cu_seqlens, max_seqlen, y, y_cu_seqlens, y_max_seqlen, softmax_scale, text_kv)
        return self.wo(out.flatten(1))

    def qkv(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``(T, H, Dh)`` and k, v ``(T, Hkv, Dh)`` of x ``(T, dim)``: projected, QK-normalized, q and k rotated."""
        t = x.shape[0]
        q = self.wq(x).view(t, self.n_heads, self.head_dim)
        k = self.wk(x).view(t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(t, self.n_kv_heads, self.head_dim)
        norm = "layer_norm" if self.qk_norm else None
        q_norm = self.q_norm if self.qk_norm else None
        k_norm = self.k_norm if self.qk_norm else None
        q, k = qk_norm_rope(q, k, freqs, q_norm, k_norm, norm, prefer=self.backend)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | VarlenLayout,
        max_seqlen: int | None,
        y: torch.Tensor | None = None,
        y_cu_seqlens: torch.Tensor | VarlenLayout | None = None,
        y_max_seqlen: int | None = None,
        softmax_scale: float | None = None,
        text_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        sparsity: TileSparsity | None = None,
        tiles: TileLayout | None = None,
    ) -> torch.Tensor:
        """:attr:`core` over :meth:`qkv`'s q, k, v and the gated text branch: ``(T, H, Dh)``, the input of wo.
        ``sparsity`` and ``tiles`` (a tile-major pack's :class:`TileLayout`) make the self part tile-sparse
        (``varlen_attention``'s arguments of those names; the text branch stays dense); ``tiles`` alone is a
        dense call over a tile-major pack. With a ``coarse_gate``, ``tiles`` also adds the gated coarse branch."""
        options = {} if sparsity is None else dict(sparsity=sparsity, tiles=tiles)
        if self.y_dim > 0 and (y is not None or text_kv is not None):
            ky, vy = text_kv if text_kv is not None else self.text_kv(y)
            options.update(
                text_k=ky.to(q.dtype),
                text_v=vy.to(q.dtype),
                text_cu_seqlens=y_cu_seqlens,
                text_max_seqlen=y_max_seqlen,
                gate=self.gate,
            )
        out = self.core(q, k, v, cu_seqlens, max_seqlen, softmax_scale, prefer=self.backend, **options)
        if self.coarse_gate is None or tiles is None:
            return out
        coarse = tile_coarse_attention(q, k, v, tiles, softmax_scale, prefer=self.backend)
        return out + torch.tanh(self.coarse_gate).to(out.dtype).view(1, -1, 1) * coarse
