"""What the norm, RoPE and packing kernel files share: grid sizing from the device and the compiled kernel,
warp counts, alignment facts the JIT cannot see, the RoPE rotation, a portable tanh, and the normalisation
math of the norm family and the QK-norm kernel (the norm codes, centring and the input gradient; each kernel
does its own reductions, over rows of a tile or over a token's pair tiles, and its own rstd: the norm family's
1/sqrt as the reference rounds it, the QK-norm's rsqrt).

Persistent grids. A kernel whose programs walk a contiguous chunk of the work (and keep partial sums in
registers) wants exactly as many programs as the GPU holds at once: fewer leave SMs idle, more run as a
second, partial wave (a program that is not resident waits for one that finishes its whole chunk).
:func:`persistent_grid` sizes the grid from the SM count and the programs of *this compiled kernel* one SM
holds (its registers, shared memory and warps), so a register-hungry variant gets fewer, longer programs
instead of a tail wave.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Which normalisation a kernel applies (constexpr NORM): none, LayerNorm (mean and variance) or RMSNorm.
NORM_NONE, NORM_LAYER, NORM_RMS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)

# sm_80/sm_90 limits, used when torch does not report them.
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
SHARED_PER_SM = 233472
MAX_PROGRAMS_PER_SM = 32


def num_warps(elements: int, per_warp: int, lo: int = 1, hi: int = 16) -> int:
    """Warps for a tile of ``elements`` values at about ``per_warp`` values per warp, a power of two in [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, elements // per_warp))))


@functools.lru_cache(maxsize=16)
def _device_limits(index: int) -> tuple[int, int, int, int]:
    props = torch.cuda.get_device_properties(index)
    return (
        props.multi_processor_count,
        getattr(props, "regs_per_multiprocessor", REGS_PER_SM),
        getattr(props, "max_threads_per_multi_processor", THREADS_PER_SM),
        getattr(props, "shared_memory_per_multiprocessor", SHARED_PER_SM),
    )


def device_limits(device: torch.device) -> tuple[int, int, int, int] | None:
    """(SMs, registers per SM, threads per SM, shared bytes per SM) of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


def programs_per_sm(limits: tuple[int, int, int, int], regs: int, warps: int, shared: int) -> int:
    """Programs of ``warps`` warps using ``regs`` registers per thread and ``shared`` bytes one SM holds."""
    _, regs_per_sm, threads_per_sm, shared_per_sm = limits
    per_warp = -(-max(regs, 1) * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    fit = min((regs_per_sm // per_warp) // warps, threads_per_sm // (32 * warps), MAX_PROGRAMS_PER_SM)
    if shared:
        fit = min(fit, shared_per_sm // (shared + 1024))  # 1 KiB per block is reserved by the driver
    return max(1, fit)


_RESIDENT: dict[tuple, int] = {}


def persistent_grid(kernel, args: tuple, kwargs: dict, n_work: int, device: torch.device, interpreted: int):
    """(programs, work items per program) for a persistent launch of ``kernel(*args, **kwargs)`` over ``n_work``
    items: SMs x :func:`resident_programs` on a GPU, ``interpreted`` programs elsewhere (the interpreter runs
    programs one after the other; a few keep the chunk borders tested)."""
    limits = device_limits(device)
    target = interpreted if limits is None else limits[0] * resident_programs(kernel, args, kwargs, limits)
    per_prog = triton.cdiv(n_work, max(1, min(n_work, target)))
    return triton.cdiv(n_work, per_prog), per_prog


def resident_programs(kernel, args: tuple, kwargs: dict, limits: tuple[int, int, int, int]) -> int:
    """Programs of this compiled variant of ``kernel`` one SM holds at once, from its registers, shared
    memory and warps. Compiles it (``warmup``, cached by Triton) on first use; the result is cached by the
    arguments' specialization. An argument whose value differs between the warm-up and the launch (the work
    per program) must be in the kernel's ``do_not_specialize``."""
    key = (kernel, limits, tuple(sorted((k, str(v)) for k, v in kwargs.items())), _arg_kinds(args))
    per_sm = _RESIDENT.get(key)
    if per_sm is None:
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()
        per_sm = programs_per_sm(limits, compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared)
        _RESIDENT[key] = per_sm
    return per_sm


def _arg_kinds(args) -> tuple:
    """What of the arguments the compiled kernel depends on: dtypes and the JIT's specializations (16-byte
    aligned pointers, integers divisible by 16 or equal to 1), not values or shapes."""
    kinds = []
    for a in args:
        if isinstance(a, torch.Tensor):
            kinds.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, tuple):
            kinds.append(_arg_kinds(a))
        elif isinstance(a, int) and not isinstance(a, bool):
            kinds.append((a == 1, a % 16 == 0, abs(a) >= 2**31))
        else:
            kinds.append(type(a).__name__)
    return tuple(kinds)


@triton.jit
def whole_vectors(value, VEC: tl.constexpr):
    """``value`` (a stride or a length the host checked to be a multiple of VEC elements) in a form the
    compiler knows is one, so that accesses built from it vectorize: exact for such a value. The JIT marks only
    multiples of 16 itself (a head stride of 72 gets no mark), and tl.multiple_of cannot mark a kernel argument."""
    return (value // VEC) * VEC


@triton.jit
def rotate_pairs(x0, x1, cos, sin):
    """Rotates each pair (x0, x1) by its angle (cos, sin); pass -sin to rotate by -angle (the transpose)."""
    return x0 * cos - x1 * sin, x0 * sin + x1 * cos


@triton.jit
def tanh(g):
    """tanh in fp32, portable across Triton 3.6 on the GPU and the CPU interpreter (no libdevice): the exp
    form away from 0, an odd series near 0 where 1 - exp(-2|g|) would cancel (zero-initialized gates live
    there)."""
    a = tl.abs(g)
    t = tl.exp(-2.0 * a)
    far = (1.0 - t) / (1.0 + t)
    a2 = a * a
    near = a * (1.0 - a2 * (1.0 / 3.0 - a2 * (2.0 / 15.0 - a2 * (17.0 / 315.0))))
    r = tl.where(a < 0.125, near, far)
    return tl.where(g < 0, -r, r)


@triton.jit
def centered(x, mean, mask, NORM: tl.constexpr):
    """What the norm divides by its root mean square: x - mean for LayerNorm (zeros outside ``mask``, so the
    variance sums only real values), x itself for RMSNorm (padding already holds zeros)."""
    if NORM == NORM_LAYER:
        return tl.where(mask, x - mean, 0.0)
    return x


@triton.jit
def norm_input_grad(g, xhat, rstd, mean_g, mean_gxhat, NORM: tl.constexpr):
    """d/dx of xhat = centered(x) * rstd(x) against the gradient g of xhat: rstd * (g - mean(g) - xhat *
    mean(g * xhat)) for LayerNorm; RMSNorm has no centring, so no mean(g) term."""
    if NORM == NORM_LAYER:
        g = g - mean_g
    return rstd * (g - xhat * mean_gxhat)
