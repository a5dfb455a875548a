"""Launchers of the flash-attention over packed variable-length sequences with Lumina's gated text branch.

Layout (flash-attn varlen convention): q ``(T, H, Dh)``, k/v ``(T, Hkv, Dh)``, sequences delimited by
``cu_seqlens`` (int32, ``(B+1,)``); text keys/values ``(Tt, Hkv, Dh)`` delimited per sample by
``text_cu_seqlens``. Cross-attention: with ``cu_seqlens_k`` the keys/values ``(Tk, Hkv, Dh)`` are packed by
their own offsets (same sample count; any key count per sample, 0 included). Tensors are read through their
token and head strides, so q/k/v may be views of one fused QKV projection (not copied); the head dim is read
as contiguous (a tensor whose head dim is not is copied).
One call comes in as a ``Problem`` (problem.py), plain tensors go out: autograd lives in
flagdit_kernels/ops/attention.py. The kernels take each (T, H, Dh) tensor as a ``(tensor, token stride, head
stride)`` view (``_view``; tiles.aligned_view on the kernel side).

The kernels: fwd.py (forward), bwd.py (backward), tiles.py (shared tile code),
autotune.py (tile choice). RoPE is applied once, outside the attention loops: q and k are rotated
into a copy by the RoPE kernel (flagdit_kernels/triton/rope.py) before the forward; the copies are what the
backward reads, and dq, dk are rotated back once at the end. (Rotating inside the loops re-rotated K for every
query block and Q for every key block, and spilled in every config: see benchmarks/compile_reports.)

Head dims that are not powers of two run as two power-of-two column chunks (72 = 64 + 16 padded to 80, 96 = 64 +
32, 48 = 32 + 16) with masked loads. Row offsets are int64 so T * H * Dh may exceed 2^31.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .. import rope as rope_kernels
from . import autotune as tuning
from . import candidates, sparse
from .bwd import STATS_WIDTH, _bwd_dkdv, _bwd_dq, _bwd_dq_postprocess, _bwd_preprocess
from .fwd import _fwd_kernel
from .offsets import repaired_shape, safe_offsets
from .problem import Problem

LOG2E = 1.4426950408889634
INTERPRETED = tuning.INTERPRETED
AUTOTUNE_MODE = tuning.AUTOTUNE_MODE  # as FLAGDIT_KERNELS_AUTOTUNE set it (autotune_mode changes it for a while)
autotune_mode = tuning.autotune_mode


FORWARD = tuning.TunedKernel("forward", _fwd_kernel, tuning.FWD_TILES)
FORWARD.alternatives = candidates.gluon_forward  # the Gluon forward, sm_90 only, verified first
# Tile-sparse forward (SPARSE=True): pointer loads over key runs, or descriptor loads over the listed key blocks
# (first where offered, see tuning.sparse_prune); no Gluon alternative.
SPARSE_FORWARD = tuning.TunedKernel("sparse forward", _fwd_kernel, tuning.FWD_TILES, tuning.sparse_prune)
DKDV = tuning.TunedKernel("dk/dv", _bwd_dkdv, tuning.DKDV_TILES, tuning.dkdv_prune)
DQ = tuning.TunedKernel("dq", _bwd_dq, tuning.DQ_TILES, tuning.backward_prune)


def tuned_tiles() -> dict[str, dict[str, str]]:
    """The tiles the autotuner chose so far in this process, per kernel: {tuning key: tile}, for reports; and
    under "backward" the way each regime's backward runs where it was timed (see backward)."""
    return {
        **{k.name: k.tuned() for k in (FORWARD, SPARSE_FORWARD, DKDV, DQ)},
        "backward": tuning.chosen_variants("backward"),
    }


def _regime(
    q: torch.Tensor, k: torch.Tensor, has_text: bool, rope: bool, max_seqlen: int, max_seqlen_k: int | None = None
) -> dict:
    """The launch's fields of a tuning key (see autotune.py); cross-attention adds its key bucket."""
    cross = {} if max_seqlen_k is None else {"seq_k": tuning.seq_bucket(max_seqlen_k)}
    return {
        **tuning.device_fields(q.device), "dtype": str(q.dtype), "head_dim": q.shape[-1],
        "gqa": q.shape[1] // max(k.shape[1], 1), "text": has_text, "rope": rope, "seq": tuning.seq_bucket(max_seqlen),
        **cross,
    }  # fmt: skip


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _chunks(head_dim: int) -> dict:
    """Head-dim chunks D0 (largest power of two <= Dh) and D1 (power of two >= 16 covering the rest, or 0)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - d0
    return {"D0": max(d0, 16), "D1": max(16, triton.next_power_of_2(rest)) if rest else 0}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs promise fp32 accuracy (DESIGN.md: rel-L2 < 1e-4), which TF32 cannot give.
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """(token stride, head stride) of a (T, H, Dh) tensor, whose head dim the kernels read as contiguous; 0 for a
    dim of size 1 (never stepped along, and an odd stride there would cost the vector width)."""
    return tuple(stride if size > 1 else 0 for size, stride in zip(t.shape[:2], t.stride()[:2]))


def _view(t: torch.Tensor) -> tuple:
    """The kernels' ``(pointer, token stride, head stride)`` of a (T, H, Dh) tensor (tiles.aligned_view)."""
    return (t, *_rows(t))


def _aligned16(t: torch.Tensor) -> bool:
    """Whether a (T, H, Dh) tensor starts 16-byte aligned with token and head strides of whole 16 bytes."""
    vec = 16 // t.element_size()
    return t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in _rows(t))


def _vector_width(*tensors: torch.Tensor) -> int:
    """Elements of the first tensor per 16 bytes when every tensor is _aligned16 (contiguous tensors at any head
    dim that is a multiple of 8, and views of a fused QKV projection), so the kernels may tell Triton so; else 1."""
    return 16 // tensors[0].element_size() if all(_aligned16(t) for t in tensors) else 1


def _unit_head_dim(*tensors: torch.Tensor | None) -> list:
    """The tensors with a contiguous head dim (stride 1), copied only where needed: the kernels read 16-byte
    vectors along it. Views of a fused QKV projection keep stride 1 and are not copied."""
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in tensors]


_ASSUMED_CAPABILITY: tuple[int, int] | None = None


@contextlib.contextmanager
def assume_capability(capability: tuple[int, int]) -> Iterator[None]:
    """Launch decisions inside are taken as for a GPU of this compute capability, whatever device the tensors
    are on: for the compile report, which compiles for a GPU this machine does not have."""
    global _ASSUMED_CAPABILITY
    saved, _ASSUMED_CAPABILITY = _ASSUMED_CAPABILITY, capability
    try:
        yield
    finally:
        _ASSUMED_CAPABILITY = saved


def _capability(device: torch.device) -> tuple[int, int] | None:
    if _ASSUMED_CAPABILITY is not None:
        return _ASSUMED_CAPABILITY
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _descriptor_ready(*tensors: torch.Tensor) -> bool:
    """Whether the forward may read these (T, H, Dh) tensors through tensor descriptors: a GPU with the copy
    engine (sm_90+), 16-byte aligned data and token/head strides (views of a fused QKV projection are), and a
    Triton with device-side descriptors. Sets Triton's scratch allocator (descriptors are built in global
    memory) unless the application set its own."""
    if INTERPRETED or not hasattr(tl, "make_tensor_descriptor"):
        return False
    capability = _capability(tensors[0].device)
    if capability is None or capability[0] < 9 or not all(_aligned16(t) for t in tensors):
        return False
    if tensors[0].device.type == "cuda":
        _ensure_scratch_allocator()
    return True


# Triton's warp specialization of the forward (fwd.py, _attend's WS shape) compiles and splits into
# producer / consumer partitions on sm_90 from Triton 3.6, checked by compiling every head dim and text variant
# for sm_90 (benchmarks/RESULTS.md). Its pass aborts the process (a C++ assertion, not an exception) on shapes it
# does not handle, so WS tiles are offered only where that check ran: 16-bit dtypes, head dims in WS_HEAD_DIMS.
WS_TRITON = (3, 6)
WS_HEAD_DIMS = (64, 72, 96, 128)
# The backward's warp-specialized shape (bwd._dkdv_ws, and _bwd_dq's WS loops) splits on sm_90 with Triton 3.6
# and 3.9 at WS_HEAD_DIMS, with and without text and GQA (tests/test_attention_ws_compile.py); where it is
# offered it is the default backward: dk/dv and dq in two kernels (no atomics: the pass fails on a loop with one).
BWD_WS_TRITONS = ((3, 6), (3, 9))
# The two ways of the backward that tuning weighs where the pair may run (backward()).
BWD_PAIR, BWD_ATOMIC_DQ = "dk/dv + dq kernels", "dk/dv with dq atomics"


def _warp_specialize_ready(q: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the forward may run its warp-specialized tiles: descriptors for q and every key / value tensor, an
    sm_90 GPU (Blackwell's pass is another one, never checked here), a checked Triton, dtype and head dim."""
    capability = _capability(q.device)
    return (
        capability is not None and capability[0] == 9 and tuning.TRITON_VERSION >= WS_TRITON
        and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in WS_HEAD_DIMS
        and _descriptor_ready(q, *tensors)
    )  # fmt: skip


def _ensure_scratch_allocator() -> None:
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _text_pointers(text_k, text_v, text_cu_seqlens, k, v, cu_seqlens):
    """(text_k, text_v, text_cu_seqlens) to launch with. Without text, or with zero text tokens in the whole
    batch, the kernels never dereference them (HAS_TEXT is a constexpr; every text length is 0), but Triton must
    not be handed an empty or absent tensor's null pointer: the self-attention tensors stand in."""
    has_text = text_k is not None
    tk = text_k if has_text and text_k.numel() else k
    tv = text_v if has_text and text_v.numel() else v
    return tk, tv, text_cu_seqlens if has_text else cu_seqlens


def _stand_in(t: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``t``, or ``other`` where ``t`` holds no element (cross-attention without any key): no program
    dereferences it then (every key length is 0), but Triton must not be handed an empty tensor's pointer."""
    return t if t.numel() else other


def _key_offsets(
    cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None, max_seqlen_k: int | None, freqs: torch.Tensor | None
) -> None:
    """Checks the cross-attention arguments against the query offsets (shapes only: no host sync)."""
    if cu_seqlens_k is None:
        if max_seqlen_k is not None:
            raise ValueError("max_seqlen_k is given without cu_seqlens_k")
        return
    if cu_seqlens_k.dim() != 1 or cu_seqlens_k.numel() != cu_seqlens.numel():
        raise ValueError(
            f"cu_seqlens_k must be 1-D with as many entries as cu_seqlens ({cu_seqlens.numel()}: one per sample "
            f"plus one), got shape {tuple(cu_seqlens_k.shape)}"
        )
    if cu_seqlens_k.dtype not in (torch.int32, torch.int64) or cu_seqlens_k.device != cu_seqlens.device:
        raise TypeError(
            f"cu_seqlens_k must be int32 or int64 on {cu_seqlens.device}, got {cu_seqlens_k.dtype} on "
            f"{cu_seqlens_k.device}"
        )
    if freqs is not None:
        raise ValueError("freqs (RoPE) is supported only for self-attention: pass cu_seqlens_k=None or freqs=None")


def _query_tiles(T: int, batch: int, heads: int):
    """The grid of a kernel with one program per (query tile, head): T // BLOCK_M + batch programs cover every
    tile of every sequence with at most one idle program per sequence (tile_of in tiles.py), known
    from the tensor shapes alone (no max_seqlen, no host sync)."""
    return lambda meta: (T // meta["BLOCK_M"] + batch, heads)


def _sparse_launch(lists: torch.Tensor | None, sizes: list[int] | None, stand_in: torch.Tensor, batch: int, block: str):
    """(programs along the rows as a function of the launch's tile, the kernels' sparse arguments) of a tile-sparse
    launch (sparse.py: ``sizes`` starts n_tiles, list heads, list width, tile volume, placeholder tokens), or
    (None, stand-ins no program reads) of a dense one."""
    if lists is None:
        return None, (stand_in, 0, 1, 0, 1)
    n_tiles, heads_listed, width, volume, placeholders = sizes[:5]
    programs = lambda meta: sparse.grid_programs(n_tiles, volume, placeholders, batch, meta[block])
    return programs, (lists, n_tiles, heads_listed, width, volume)


def _rotated(x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
    """x rotated by RoPE (a contiguous copy in x's dtype, fp32 math) when ``freqs`` is given, else x itself."""
    return x if freqs is None else rope_kernels.apply_rope(x, freqs, interleaved=True)


def forward(p: Problem) -> tuple[torch.Tensor, ...]:
    """Returns ``(out, o_text, lse_self, lse_text, q_used, k_used, offsets)``; LSEs are fp32 ``(H, T)`` in
    natural log; o_text and lse_text are empty without text; q_used / k_used are what the backward must read (q
    and k rotated by RoPE with ``freqs``, else q and k); ``offsets`` the call's offsets as repaired for the
    kernels (offsets.safe_offsets: cu_seqlens, then text_cu_seqlens and cu_seqlens_k where given), which the
    backward may take as they are (Problem.offsets_repaired).

    Cross-attention: with ``cu_seqlens_k`` (as many entries as ``cu_seqlens``), k and v are ``(Tk, Hkv, Dh)``
    and sample b's queries attend to key rows ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (any number, 0 included:
    then the self part of its rows is exactly 0 and their self LSE -inf). ``max_seqlen_k`` is a tuning hint
    only. RoPE (``freqs``) is supported only for self-attention (ValueError otherwise). The text branch and
    gate work as for self-attention.

    Tile-sparse self-attention: ``sparse_lists`` / ``sparse_sizes`` from sparse.lists (the key tiles of every
    query tile of a tile-major pack); the text branch stays dense."""
    _key_offsets(p.cu_seqlens, p.cu_seqlens_k, p.max_seqlen_k, p.freqs)
    q, k = _rotated(p.q, p.freqs), _rotated(p.k, p.freqs)
    q, k, v, text_k, text_v = _unit_head_dim(q, k, p.v, p.text_k, p.text_v)
    T, H, D = q.shape
    h_kv = k.shape[1]
    batch = p.cu_seqlens.numel() - 1
    has_text = p.has_text
    # No sequence at all (only with unchecked, bad offsets: one entry, yet tokens): nothing covers the tokens,
    # so the outputs are zeros rather than memory no program wrote. Otherwise every row is written (see
    # offsets.py), poisoned-output tests included.
    alloc = torch.empty if batch > 0 and T > 0 else torch.zeros
    out = alloc((T, H, D), dtype=q.dtype, device=q.device)
    lse = alloc((H, T), dtype=torch.float32, device=q.device)
    o_text = alloc((T, H, D) if has_text else (0,), dtype=q.dtype, device=q.device)
    lse_t = alloc((H, T) if has_text else (0,), dtype=torch.float32, device=q.device)
    if T == 0 or batch <= 0:
        # Never read: the backward returns early too.
        shape = repaired_shape(batch + 1, has_text, p.cu_seqlens_k is not None)
        offsets = torch.zeros(shape, dtype=torch.int32, device=q.device)
        return out, o_text, lse, lse_t, q, k, offsets
    q_used, k_used = q, k
    offsets, cu_seqlens, text_cu_seqlens, kcu = _offsets(p, T, k.shape[0])
    k, v = _stand_in(k, q), _stand_in(v, q)
    tk, tv, tcu = _text_pointers(text_k, text_v, text_cu_seqlens, k, v, cu_seqlens)
    tg = p.tanh_gate if has_text else lse
    ot = o_text if has_text else out
    lt = lse_t if has_text else lse
    programs, sparse_table = _sparse_launch(p.sparse_lists, p.sparse_sizes, cu_seqlens, batch, "BLOCK_M")
    kernel, sparse_consts = (FORWARD, {}) if programs is None else (SPARSE_FORWARD, {"SPARSE": True})
    # The sparse descriptor loop's fully masked blocks (past a partial tile) need a positive scale (fwd.py).
    descriptors_ok = not sparse_consts or p.softmax_scale > 0
    kernel.launch(
        _query_tiles(T, batch, H) if programs is None else lambda meta: (programs(meta), H),
        _view(q), _view(k), _view(v), _view(tk), _view(tv), _view(out), ot, tg, lse, lt, (cu_seqlens, tcu, kcu),
        sparse_table, p.softmax_scale * LOG2E, LOG2E / math.sqrt(D), T, H // h_kv, batch, (batch - 1).bit_length(),
        HEAD_DIM=D, **_chunks(D), HAS_TEXT=has_text, DOT_PREC=_dot_precision(q.dtype),
        TMA_OK=_descriptor_ready(k, v) and descriptors_ok, VEC=_vector_width(q, k, v, tk, tv, out),
        WS_OK=_warp_specialize_ready(q, k, v, tk, tv) and descriptors_ok,
        regime=_regime(q, k, has_text, p.freqs is not None, p.max_seqlen, p.max_seqlen_k), **sparse_consts,
    )  # fmt: skip
    return out, o_text, lse, lse_t, q_used, k_used, offsets


def _offsets(p: Problem, T: int, t_keys: int) -> tuple[torch.Tensor, ...]:
    """(the repaired offsets' rows, cu_seqlens, text_cu_seqlens, cu_seqlens_k) to launch with: repaired here
    (offsets.py), or as they are where the forward repaired them already."""
    if p.offsets_repaired:
        return (None, p.cu_seqlens, p.text_cu_seqlens, p.cu_seqlens if p.cu_seqlens_k is None else p.cu_seqlens_k)
    t_text = p.text_k.shape[0] if p.has_text else 0
    return safe_offsets(p.cu_seqlens, T, p.text_cu_seqlens, t_text, p.cu_seqlens_k, t_keys)


def backward(
    p: Problem,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    out: torch.Tensor,
    o_text: torch.Tensor,
    lse: torch.Tensor,
    lse_t: torch.Tensor,
    deterministic: bool = False,
):
    """Returns ``(dq, dk, dv, d_text_k, d_text_v, d_tanh_gate)`` (the text ones None without text); ``dlse`` is
    the gradient of the self-attention LSE, fp32 ``(H, T)``, or None; ``out`` ... ``lse_t`` the forward's.
    ``p.q`` and ``p.k`` are the forward's ``q_used`` / ``k_used`` (rotated with ``freqs``), and dq, dk are
    rotated back to the unrotated inputs' gradients. d_tanh_gate is fp32 ``(H,)``: per-token partial sums
    written by the preprocess kernel, summed per head.

    Default: five matmuls per (key block, query block), dq added with fp32 atomics by the dk/dv programs, so
    its sums run in whatever order the programs finish. ``deterministic``: the dk/dv kernel skips dq and a
    separate dq kernel recomputes the scores (seven matmuls), every sum in a fixed order, bit for bit stable.
    On sm_90 with a Triton in BWD_WS_TRITONS that seven-matmul pair is the default, warp-specialized (bwd.py);
    tuned (FLAGDIT_KERNELS_AUTOTUNE=1), a non-deterministic call times the pair against the five-matmul kernel
    the first time its regime is seen and keeps the faster (the tuning cache; ``tuned_tiles()["backward"]``).

    Cross-attention as in ``forward`` (dk, dv are ``(Tk, Hkv, Dh)``; keys of a sample without queries get
    exactly 0). Tile-sparse: dq visits the forward's key runs, dk / dv the query runs of the transposed lists
    (built here, on the device)."""
    _key_offsets(p.cu_seqlens, p.cu_seqlens_k, p.max_seqlen_k, p.freqs)
    dout, q, k, v, text_k, text_v = _unit_head_dim(dout, p.q, p.k, p.v, p.text_k, p.text_v)
    T, H, D = q.shape
    h_kv = k.shape[1]
    batch = p.cu_seqlens.numel() - 1
    has_text = p.has_text
    softmax_scale, sparse_lists = p.softmax_scale, p.sparse_lists
    dev = q.device
    alloc = torch.empty if batch > 0 and T > 0 else torch.zeros  # as in forward
    dq = alloc((T, H, D), dtype=q.dtype, device=dev)
    # fp32, in units of log2(e) * dq: zeroed before the atomic adds (the dk/dv launch's reset), written whole by
    # the deterministic dq kernel.
    dq_acc = torch.empty((T, H, D), dtype=torch.float32, device=dev)
    dk = alloc(k.shape, dtype=k.dtype, device=dev)
    dv = alloc(v.shape, dtype=v.dtype, device=dev)
    dtk = alloc(text_k.shape, dtype=text_k.dtype, device=dev) if has_text else None
    dtv = alloc(text_v.shape, dtype=text_v.dtype, device=dev) if has_text else None
    delta = torch.empty((H, T), dtype=torch.float32, device=dev)
    delta_t = torch.empty((H, T), dtype=torch.float32, device=dev) if has_text else delta
    r = torch.empty((H, T), dtype=torch.float32, device=dev) if has_text else delta
    if T == 0 or batch <= 0:
        dgate = torch.zeros(H, dtype=torch.float32, device=dev) if has_text else None
        return dq, dk, dv, dtk, dtv, dgate
    t_keys = k.shape[0]
    _, cu_seqlens, text_cu_seqlens, kcu = _offsets(p, T, t_keys)
    tg = p.tanh_gate if has_text else delta
    ot = o_text if has_text else out
    lt = lse_t if has_text else lse
    block_t = 32  # token-parallel kernels: 32 rows of up to three head-dim tiles stay in registers
    if dlse is not None:
        dlse = dlse.contiguous()
    text_scale = 1.0 / math.sqrt(D)
    tk, tv, tcu = _text_pointers(text_k, text_v, text_cu_seqlens, _stand_in(k, q), _stand_in(v, q), cu_seqlens)
    # sm_90 with a checked Triton: the warp-specialized kernels, dq by its own kernel (deterministic too), which
    # reads the rows' statistics as one tile (bwd.STATS_WIDTH fp32 a row) and needs a positive scale for it.
    ws_ok = (
        tuning.TRITON_VERSION in BWD_WS_TRITONS and softmax_scale > 0
        and _warp_specialize_ready(q, dout, _stand_in(k, q), _stand_in(v, q), tk, tv)
    )  # fmt: skip
    stats = torch.empty((H, T, STATS_WIDTH) if ws_ok else (0,), dtype=torch.float32, device=dev)
    # No key at all (cross-attention): stand-ins no program dereferences (see _stand_in).
    k, v, dk_, dv_ = _stand_in(k, q), _stand_in(v, q), _stand_in(dk, dq), _stand_in(dv, dq)
    prec = _dot_precision(q.dtype)
    # Text key tiles first in the grid (program ids are dispatched in order): they run alongside the self ones.
    t_text = text_k.shape[0] if has_text else 0
    text_tiles = (lambda meta: t_text // meta["BLOCK_N"] + batch) if has_text else (lambda meta: 0)
    # Then the self key tiles, over the key offsets (the query offsets for self-attention): only real tiles; or a
    # tile-sparse call's key tile chunks, over the transposed lists (per key tile, the query tiles visiting it).
    transposed = (None, None) if sparse_lists is None else sparse.transposed_lists(sparse_lists, p.sparse_sizes)
    key_programs, key_table = _sparse_launch(*transposed, cu_seqlens, batch, "BLOCK_N")
    query_programs, query_table = _sparse_launch(sparse_lists, p.sparse_sizes, cu_seqlens, batch, "BLOCK_M")
    sparse_consts = {} if sparse_lists is None else {"SPARSE": True}
    if key_programs is None:
        grid = lambda meta: (text_tiles(meta) + t_keys // meta["BLOCK_N"] + batch, h_kv)
    else:
        grid = lambda meta: (text_tiles(meta) + key_programs(meta), h_kv)
    dtk_, dtv_ = (dtk, dtv) if has_text and text_k.numel() else (dk_, dv_)
    regime = _regime(q, k, has_text, p.freqs is not None, p.max_seqlen, p.max_seqlen_k)
    views = (_view(q), _view(k), _view(v), _view(tk), _view(tv), _view(dout), _view(dq_acc))
    offsets = (cu_seqlens, tcu, kcu)

    def run(pair: bool) -> None:
        """Everything up to the fp32 dq buffer, one way: every buffer written whole (dq_acc zeroed first for
        the atomics), so whichever ran last alone decides the result. A tile-sparse call runs the pair
        warp-specialized too (descriptor loops over its listed blocks, bwd.py), its descriptors only in that
        shape (tuning.backward_prune); elsewhere pointer loads over its runs (sparse.py)."""
        split_dq = deterministic or pair
        ws = pair
        _bwd_preprocess[(triton.cdiv(T, block_t), H)](
            _view(dout), _view(out), ot, tg, lse, lt, delta if dlse is None else dlse, delta, delta_t, r,
            stats if ws else delta, T, softmax_scale * LOG2E, text_scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=_block_d(D), HAS_TEXT=has_text, HAS_DLSE=dlse is not None,
            VEC=_vector_width(dout, out, ot), BLOCK_T=block_t, HAS_STATS=ws,
        )  # fmt: skip
        DKDV.launch(
            grid,
            *views, (dk_, dv_, *_rows(dk_)), (dtk_, dtv_, *_rows(dtk_)), tg, lse, lt, delta, delta_t, offsets,
            key_table, softmax_scale * LOG2E, text_scale * LOG2E, T, t_text, H // h_kv, batch,
            (batch - 1).bit_length(),
            HEAD_DIM=D, **_chunks(D), HAS_TEXT=has_text, DOT_PREC=prec, ATOMIC_DQ=not split_dq,
            TMA_OK=_descriptor_ready(q, dout, dq_acc) and (ws or not sparse_consts),
            VEC=_vector_width(q, k, v, tk, tv, dout, dk_, dtk_), WS_OK=ws,
            regime=regime, reset=dq_acc.zero_ if not split_dq else None, **sparse_consts,
        )  # fmt: skip
        if split_dq:
            DQ.launch(
                _query_tiles(T, batch, H) if query_programs is None else lambda meta: (query_programs(meta), H),
                *views, tg, lse, lt, delta, delta_t, stats if ws else delta, offsets, query_table,
                softmax_scale * LOG2E, text_scale * LOG2E, softmax_scale, text_scale, T, H // h_kv, batch,
                (batch - 1).bit_length(),
                HEAD_DIM=D, **_chunks(D), HAS_TEXT=has_text, DOT_PREC=prec,
                TMA_OK=_descriptor_ready(k, v) and (ws or not sparse_consts), VEC=_vector_width(q, k, v, tk, tv, dout),
                WS_OK=ws, regime=regime, **sparse_consts,
            )  # fmt: skip

    # Where the pair may run it is the default, but whether it beats the five-matmul kernel (dq by atomics) is
    # the card's to say: tuned, the first call of a regime times both whole (each with its tuned tiles) and the
    # tuning cache keeps the faster. Deterministic calls never take the atomics.
    # (Tile-sparse calls keep the pair's dq path there, untimed.)
    pair = ws_ok
    choose = ws_ok and not deterministic and sparse_lists is None
    if choose and tuning.AUTOTUNE_MODE == "1":
        sources = [getattr(kernel.fn, "cache_key", "") for kernel in (DKDV, DQ)]
        variants = {BWD_PAIR: lambda: run(True), BWD_ATOMIC_DQ: lambda: run(False)}
        pair = tuning.choose_variant("backward", {**regime, "sources": sources}, variants) == BWD_PAIR
    elif choose and tuning.AUTOTUNE_MODE == "compile":
        run(False)  # compiles the other way's tiles too, for the tuned runs to come (the pair still runs last)
    run(pair)
    # dq: the buffer in q's dtype, rotated back with RoPE (the gradient of the rotated q -> the input's).
    table = p.freqs.contiguous() if p.freqs is not None else dq_acc
    _bwd_dq_postprocess[(triton.cdiv(T, block_t), H)](
        _view(dq_acc), _view(dq), (table, table.stride(0)), T, 1 / LOG2E,
        HEAD_DIM=D, BLOCK_D=_block_d(D), ROPE=p.freqs is not None, VEC=_vector_width(dq), BLOCK_T=block_t,
    )  # fmt: skip
    if p.freqs is not None:
        dk = rope_kernels.apply_rope(dk, p.freqs, interleaved=True, inverse=True)
    dgate = r.sum(dim=1) if has_text else None
    return dq, dk, dv, dtk, dtv, dgate
