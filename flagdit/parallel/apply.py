"""Sequence parallelism applied to a :class:`flagdit.FlagDiT`: its forward runs on each rank's share of the
tokens, and its attention over the group.

``parallelize(model, group)`` changes no parameter and no model code. It gives the instance a forward that
composes the model's own steps: ``prepare`` (on every rank, the same: pack the batch, build its layout and
RoPE table once, encode the caption), then this rank's :class:`~.sharding.TokenShard` of the layout, then
``embed_rows`` and ``transform`` on this rank's rows only (everything but attention is token-local: norms,
modulation by each token's sample, the FFN, RoPE by each token's own position), then one all-gather of the
final layer's ``p*p*C``-wide rows and ``unpack_output``. Every block's ``attention.core`` becomes
:func:`sequence_parallel_attention`, which finds the shard in the layout it is handed.

Gradients. Every rank returns the whole batch's output, so each computes the whole loss; the gather's
backward sums the group's gradients of a rank's rows, so each rank's parameter gradients are ``P`` times its
share, and averaging them over the group (what DDP and FSDP2 do across the world) gives exactly the
single-process gradient of the loss.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh

import flagdit_kernels as fk

from ..model import FlagDiT, TokenLayout
from .mesh import SPGroup, sp_group
from .ring import ring_attention
from .sharding import AGREED_DTYPES, CHUNKED, CONTIGUOUS, ShardedLayout, shard_tokens
from .ulysses import check_heads, ulysses_attention

STRATEGIES = ("auto", "ulysses", "ring")


class SequenceParallel:
    """The sequence parallelism of one model over one group: ``strategy`` ``"ulysses"`` (all-to-all to heads;
    needs the head counts :func:`~.ulysses.check_heads` accepts), ``"ring"`` (key/value blocks around the group;
    any head count) or ``"auto"`` (Ulysses where the heads split, else ring). Built on every rank with the same
    arguments; every check here is local, so a bad argument raises the same ``ValueError`` everywhere before
    any rank communicates."""

    def __init__(self, group: ProcessGroup | DeviceMesh | SPGroup, n_heads: int, n_kv_heads: int, strategy="auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.sp = sp_group(group)
        if strategy == "auto":
            try:
                check_heads(n_heads, n_kv_heads, self.sp.size)
                strategy = "ulysses"
            except ValueError:
                strategy = "ring"
        elif strategy == "ulysses":
            check_heads(n_heads, n_kv_heads, self.sp.size)
        self.strategy = strategy

    @property
    def shard_kind(self) -> str:
        return CONTIGUOUS if self.strategy == "ulysses" else CHUNKED

    def forward(self, model: FlagDiT, x, t, cap_feats=None, cap_mask=None, **kwargs):
        """``model(x, t, cap_feats, cap_mask, **kwargs)`` with the tokens spread over the group (module
        docstring); returns the whole batch's output on every rank."""
        if model.attention_sparsity is not None:
            raise ValueError("tile-sparse attention (attention_sparsity) does not run sequence-parallel yet")
        if model.config.coarse_attention:  # each rank's tokens hold only part of a sample's tiles
            raise ValueError("the coarse attention branch (config coarse_attention) does not run sequence-parallel yet")
        inputs = model.prepare(x, t, cap_feats, cap_mask, **kwargs)
        layout = inputs.layout
        agreement = model_agreement(model, self.shard_kind)
        shard = shard_tokens(layout.seqs, inputs.packed.seqlens, self.sp, self.shard_kind, inputs.text.seqs, agreement)
        local = TokenLayout(shard.layout, shard.split(layout.freqs), layout.softmax_scale)
        h, adaln_input = model.embed_rows(inputs, shard.rows)
        h = model.transform(h, local, inputs.text, adaln_input)
        return model.unpack_output(shard.gather(h), inputs)


def model_agreement(model: FlagDiT, shard_kind: str) -> dict[str, int]:
    """What every rank of a group must agree about, as integers for :func:`~.sharding.check_batch`: the head
    counts and widths (shapes of every exchange), the dtype the attention runs in (autocast's, when on) and the
    strategy (Ulysses' all-to-alls and the ring's shifts never meet: mixing them would hang)."""
    c = model.config
    param = next(model.parameters())
    dtype = param.dtype
    if torch.is_autocast_enabled(param.device.type):
        dtype = torch.get_autocast_dtype(param.device.type)
    code = AGREED_DTYPES.index(dtype) if dtype in AGREED_DTYPES else len(AGREED_DTYPES)
    strategy = (CONTIGUOUS, CHUNKED).index(shard_kind)
    return {"n_heads": c.n_heads, "n_kv_heads": c.kv_heads, "head_dim": c.head_dim, "dim": c.dim,
            "cap_feat_dim": c.cap_feat_dim, "dtype": code, "strategy": strategy}  # fmt: skip


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: ShardedLayout,
    max_seqlen: int | None = None,
    softmax_scale: float | None = None,
    *,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_cu_seqlens: fk.VarlenLayout | torch.Tensor | None = None,
    text_max_seqlen: int | None = None,
    gate: torch.Tensor | None = None,
    freqs: torch.Tensor | None = None,
    return_lse: bool = False,
    **attention_kwargs,
) -> torch.Tensor:
    """``fk.varlen_attention``'s signature over a sequence-parallel shard: q ``(N, H, Dh)``, k/v ``(N, Hkv, Dh)``
    are this rank's rows and ``cu_seqlens`` their :class:`~.sharding.ShardedLayout`; the result is this rank's
    rows of the whole batch's attention. Ulysses or ring as the shard says."""
    if not isinstance(cu_seqlens, ShardedLayout) or cu_seqlens.shard is None:
        raise TypeError(
            "cu_seqlens must be the ShardedLayout of a sequence-parallel forward (flagdit.parallel.parallelize), "
            f"got {type(cu_seqlens).__name__}"
        )
    if return_lse:
        raise ValueError("return_lse=True is not available across a sequence-parallel group")
    shard = cu_seqlens.shard
    if q.shape[0] != shard.num_rows:
        raise ValueError(f"q has {q.shape[0]} rows but this rank's shard holds {shard.num_rows}")
    if max_seqlen is not None and max_seqlen != cu_seqlens.max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) differs from the shard's ({cu_seqlens.max_seqlen})")
    if freqs is not None:  # RoPE is token-local: rotate this rank's rows before they travel
        q, k = fk.apply_rope(q, freqs), fk.apply_rope(k, freqs)
    text = {}
    if text_k is not None:
        text = dict(text_k=text_k, text_v=text_v, text_cu_seqlens=text_cu_seqlens, text_max_seqlen=text_max_seqlen,
                    gate=gate)  # fmt: skip
    attend = ulysses_attention if shard.kind == CONTIGUOUS else ring_attention
    return attend(q, k, v, shard, softmax_scale, text, **attention_kwargs)


def _parallel_forward(self: FlagDiT, *args, **kwargs):
    return self.sequence_parallel.forward(self, *args, **kwargs)


def _check_device(model: FlagDiT, sp: SPGroup) -> None:
    device = next(model.parameters()).device
    if sp.device_type is not None and sp.device_type != device.type:
        raise ValueError(f"group is a {sp.device_type!r} mesh but the model's parameters are on {device.type!r}")


def parallelize(model: FlagDiT, group: ProcessGroup | DeviceMesh | SPGroup, strategy: str = "auto") -> FlagDiT:
    """Applies sequence parallelism over ``group`` (a ProcessGroup, a 1D DeviceMesh or an :func:`~.mesh.init_mesh`
    mesh, whose ``"sp"`` dimension is used) to ``model`` in place and returns it. Call it on every rank of the
    group, before or after ``fully_shard`` / DDP; :func:`unparallelize` undoes it."""
    if not isinstance(model, FlagDiT):
        raise TypeError(f"model must be a flagdit.FlagDiT, got {type(model).__name__}")
    if getattr(model, "sequence_parallel", None) is not None:
        raise ValueError("model is already sequence-parallel (unparallelize it first)")
    c = model.config
    plan = SequenceParallel(group, c.n_heads, c.kv_heads, strategy)
    _check_device(model, plan.sp)
    model.sequence_parallel = plan
    model.forward = types.MethodType(_parallel_forward, model)
    for layer in model.layers:
        layer.attention.core = sequence_parallel_attention
    return model


def unparallelize(model: FlagDiT) -> FlagDiT:
    """Restores the single-process forward and attention of a model :func:`parallelize` changed."""
    if getattr(model, "sequence_parallel", None) is None:
        raise ValueError("model is not sequence-parallel")
    del model.forward, model.sequence_parallel
    for layer in model.layers:
        del layer.attention.core
    return model


@contextlib.contextmanager
def sequence_parallel(
    model: FlagDiT, group: ProcessGroup | DeviceMesh | SPGroup, strategy: str = "auto"
) -> Iterator[FlagDiT]:
    """``model`` sequence-parallel over ``group`` inside the block (for inference, e.g. ``flagdit.sample``).
    A model already parallelized over the same group is used as it is; over another group, a ``ValueError``."""
    current = getattr(model, "sequence_parallel", None)
    if current is not None:
        wanted = sp_group(group)
        if wanted.group is not current.sp.group:
            raise ValueError(
                f"model is sequence-parallel over another group ({current.sp.size} ranks) than the one given "
                f"({wanted.size} ranks)"
            )
        yield model
        return
    parallelize(model, group, strategy)
    try:
        yield model
    finally:
        unparallelize(model)
