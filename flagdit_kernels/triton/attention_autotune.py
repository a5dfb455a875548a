"""Tile choice of the varlen attention kernels: the configs each kernel may run, and how a launch picks one.

On the GPU the configs below are ordinary flash-attention tiles that compile with Triton 3.6 and newer; the
pruner drops tiles too big for the head dim (registers / shared memory). Results are cached on disk (Triton's
cache dir), keyed by head dim, variant, dtypes, Triton version and GPU arch, so tuning is paid once per
machine. FLAGDIT_KERNELS_AUTOTUNE=0 skips tuning and launches the first config that fits: one compile per
variant and no benchmarking (the GPU test suite runs this way). FLAGDIT_KERNELS_AUTOTUNE=compile runs every
config once without timing it: it fills Triton's on-disk cache, so processes warming it in parallel
(``python -m flagdit_kernels.bench.warm``) spare a later tuning run the compiles. The interpreter always runs
one small tile.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import triton
from triton.runtime.errors import OutOfResources, PTXASError

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])
AUTOTUNE_MODE = "0" if INTERPRETED else os.environ.get("FLAGDIT_KERNELS_AUTOTUNE", "1")
if AUTOTUNE_MODE not in ("0", "1", "compile"):
    raise ValueError(f"FLAGDIT_KERNELS_AUTOTUNE must be 0, 1 or compile, got {AUTOTUNE_MODE!r}")


@contextlib.contextmanager
def autotune_mode(mode: str) -> Iterator[None]:
    """Launches inside use ``mode`` (as FLAGDIT_KERNELS_AUTOTUNE would), e.g. "compile" for every config."""
    global AUTOTUNE_MODE
    saved, AUTOTUNE_MODE = AUTOTUNE_MODE, mode
    try:
        yield
    finally:
        AUTOTUNE_MODE = saved


def cfg(bm: int, bn: int, warps: int, stages: int, **flags) -> triton.Config:
    """A tile; ``flags`` are the kernel's other tuned constexprs (TMA: keys and values through tensor descriptors,
    for the forward and dq kernels)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, **flags}, num_warps=warps, num_stages=stages)


if INTERPRETED:
    FWD_CONFIGS = [cfg(32, 32, 4, 1, TMA=False)]
    DQ_CONFIGS = [cfg(32, 32, 4, 1, TMA=False)]
    DKDV_CONFIGS = [cfg(32, 32, 4, 1, TMA=False)]
else:
    # Chosen from ptxas register/spill reports for sm_90 (Triton 3.6 and 3.9, bf16, Dh 128; no GPU was available
    # to time them), first the untuned default: 8 warps (two warpgroups) for 128-row tiles (4 warps spill the
    # 128-row fp32 accumulator); small query tiles for dk/dv (dk and dv accumulators plus k and v stay resident
    # for a whole program). Each extra config costs a compile (seconds) the first time a variant is tuned.
    # The forward also tries the copy engine (TMA) for keys and values: no address arithmetic in the loop and
    # 188 instead of 230 registers at 128x64 (Triton 3.6, sm_90, D128). Triton's warp specialization (tl.range(...,
    # warp_specialize=True)) was tried too: 3.6 does not split this loop on sm_90 (a kernel with work after the
    # loop, our tail tile, is left unspecialized, and one variant crashed its pass manager), so it is not offered.
    FWD_CONFIGS = [
        cfg(128, 64, 8, 3, TMA=False),
        cfg(128, 128, 8, 2, TMA=False),
        cfg(128, 64, 8, 4, TMA=False),
        cfg(64, 64, 4, 3, TMA=False),
        cfg(64, 32, 4, 2, TMA=False),
        cfg(128, 64, 8, 3, TMA=True),
        cfg(128, 128, 8, 2, TMA=True),
    ]
    DQ_CONFIGS = [
        cfg(128, 64, 8, 2, TMA=False),
        cfg(128, 32, 8, 3, TMA=False),
        cfg(64, 64, 4, 2, TMA=False),
        cfg(64, 32, 4, 2, TMA=False),
        cfg(128, 64, 8, 2, TMA=True),
    ]
    # dk/dv (+ dq by atomics): 8 warps hold the two (BLOCK_N, Dh) fp32 accumulators, 128 registers a thread at
    # BLOCK_N x Dh = 128 x 128. 64x128 fits without spilling in its loop only with tensor descriptors (q, dO
    # through the copy engine, dq added by TMA reduce: no per-thread addresses); with pointer loads and pointer
    # atomics it spills inside the loop, so the pointer default is 32x128. Dh 256 takes 32x64 (every tile tried
    # there spills some). Compile report (benchmarks/compile_reports) for all of it; see _dkdv_prune for 3.6.
    DKDV_CONFIGS = [
        cfg(64, 128, 8, 2, TMA=True),
        cfg(32, 128, 8, 2, TMA=True),
        cfg(32, 128, 8, 2, TMA=False),
        cfg(32, 64, 8, 2, TMA=True),
        cfg(32, 64, 8, 2, TMA=False),
        cfg(64, 128, 8, 3, TMA=True),
        cfg(64, 128, 8, 1, TMA=True),
    ]


def prune(configs, named_args, **kwargs):
    """Keeps tiles whose q/k/v/acc footprint fits for this head dim (256 needs small tiles), and descriptor
    (TMA) tiles only where the launcher found the tensors fit descriptors (TMA_OK)."""
    args = {**named_args, **kwargs}
    block_d = args.get("D0", 128) + args.get("D1", 0)
    usable = [c for c in configs if args.get("TMA_OK", False) or not c.kwargs.get("TMA", False)]
    keep = [c for c in usable if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * block_d <= 128 * 128]
    return keep or [min(usable, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def dkdv_prune(configs, named_args, **kwargs):
    """prune, less the pipelined 64x128 dk/dv tile at head dims of 128 columns or more on Triton 3.6, where it
    spills inside its loop (40 local accesses per iteration at Dh 128; Triton 3.9 holds it in registers)."""
    args = {**named_args, **kwargs}
    if TRITON_VERSION < (3, 7) and args.get("D0", 128) + args.get("D1", 0) >= 128:
        configs = [c for c in configs if not (c.kwargs["BLOCK_M"] == 64 and c.num_stages > 1)]
    return prune(configs, named_args, **kwargs)


def autotune(configs, key, pruner=prune):
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": pruner}, cache_results=True
    )


def launch(kernel, grid, *args, **consts) -> None:
    """Launches an autotuned kernel as AUTOTUNE_MODE says: tuned ("1"), with the first config that fits this head
    dim and the card ("0", the interpreter), or once with every config that fits ("compile")."""
    if AUTOTUNE_MODE == "1":
        kernel[grid](*args, **consts)
        return
    error = None
    pruner = kernel.early_config_prune if hasattr(kernel, "early_config_prune") else prune
    for config in pruner(kernel.configs, consts):
        try:
            kernel.fn[grid](*args, **consts, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        except (OutOfResources, PTXASError) as exc:
            error = exc  # the card cannot hold this tile (shared memory, registers): the autotuner skips it too
            continue
        if AUTOTUNE_MODE == "0":
            return
    if AUTOTUNE_MODE == "0" and error is not None:
        raise error
