"""What the attention kernels compile to on Hopper, without a GPU: registers, spills, shared memory and the
instruction mix of each kernel's inner loop, for the launches a real call of each benchmark shape makes.

Nothing is specialized by hand. The report calls the Triton backend of ``varlen_attention`` (forward, then
backward through autograd) on CPU tensors of the benchmark's real shapes and layouts, with Triton's launch
path pointed at a stand-in sm_90 device: each kernel launch goes through Triton's own argument specialization
(a head stride of 72 is not divisible by 16, pointers are checked for 16-byte alignment, integer 1 becomes a
constant), is compiled for the target by Triton's NVIDIA backend and its bundled ptxas, and is not run. The
launcher picks tiles exactly as on the GPU (the untuned default: the first config that fits, skipping tiles
over the card's shared memory; ``--all-configs``: every config the autotuner would try). Tensors come from
``torch.empty``, so the 100+ MB inputs are never touched::

    flagdit-bench compile-report                  # Markdown table to stdout
    flagdit-bench compile-report --json out.json --md out.md --head-dims 72,128

Per compiled kernel: ptxas's registers and spill bytes (from the log of Triton's own ptxas run), shared memory,
and, in the main loop (the innermost loop with the most matmul instructions in the SASS), the count of
instructions, tensor-core ops (``HGMMA``, i.e. wgmma; and ``tl.dot``s in the TTGIR), ``cp.async``
(``LDGSTS``), TMA loads (``UTMALDG``), 16-byte global loads / stores, scalar 2-byte global accesses, local
memory accesses (spills inside the loop) and atomics. For the attention kernels the grid is compared with the
tiles that hold tokens. Run without ``TRITON_INTERPRET``; one target per process.

Structure (a second table, and keys of every JSON row): ``engine`` (triton or gluon), ``partitions`` (warps and
registers of the default partition and of each warp-specialized worker), and per inner loop that does work
(``loops``): wgmma count and shapes, ``wgmma_wait_pending`` (the deepest wgmma wait, 0 = waited to zero) and every
wait depth, CTA-wide and named barriers, TMA loads, cp.async, 16- and 2-byte global accesses, ``mma_sync``
(HMMA), ``spill_accesses`` and EX2; per kernel the PTX's wait depths and ptxas's notes when it serialized the
wgmmas. ``--gluon`` adds the Gluon forward (triton/attention/gluon_fwd.py) at the head dims it takes; its loops
also carry ``warp_votes`` (the lazy rescale's warp-uniform skip).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from .sass import barriers, count_classes, instructions, sass, wgmma_shapes, wgmma_waits

# Opt-in shared memory per block on sm_90 and sm_100 (227 KB): a bigger tile fails to launch there.
SHARED_LIMIT = 232448
# The packed batch of the benchmarks (five mixed-resolution samples, 16624 tokens) and its text length.
PACKED_LENS = (4160, 2112, 8256, 1056, 1040)
TEXT_TOKENS = 128


@dataclass(frozen=True)
class Shape:
    """One benchmark layout: sequence lengths, query / kv heads, head dim."""

    name: str
    lens: tuple[int, ...]
    heads: int
    kv_heads: int
    head_dim: int


SHAPES = {
    64: Shape("dense B2 L4096 H32", (4096, 4096), 32, 32, 64),
    72: Shape("packed 16624 tok H32/8 (Lumina-Next 2B)", PACKED_LENS, 32, 8, 72),
    96: Shape("dense B4 L4096 H24", (4096,) * 4, 24, 24, 96),
    128: Shape("packed 16624 tok H32", PACKED_LENS, 32, 32, 128),
    256: Shape("packed 16624 tok H16", PACKED_LENS, 16, 16, 256),
}


@dataclass
class Row:
    """One compiled launch and what its SASS / TTGIR / ptxas log show."""

    shape: str
    head_dim: int
    text: bool
    rope: bool
    kernel: str
    config: str
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int = 0
    fits: bool = True
    grid: tuple[int, ...] = ()
    programs: int = 0
    useful_programs: int | None = None
    kernel_counts: dict = field(default_factory=dict)
    loop_counts: dict = field(default_factory=dict)
    loop_dots: int = 0
    kernel_dots: int = 0
    local_in_loops: int = 0  # local-memory accesses (spills) in all innermost loops together
    engine: str = "triton"  # or "gluon"
    partitions: list = field(default_factory=list)  # see _partitions
    loops: list = field(default_factory=list)  # see _loop_structure, one per innermost loop that does work
    ptx_wgmma_waits: list = field(default_factory=list)  # distinct wgmma.wait_group depths in the PTX
    ptxas_notes: list = field(default_factory=list)  # ptxas's "Potential Performance Loss" notes (serialized wgmma)


# ----------------------------------------------------------------------------------------------------------------
# Capturing launches: Triton's launch path, compiled for a stand-in device and never run
# ----------------------------------------------------------------------------------------------------------------


class _StandInDriver:
    """What Triton's JIT asks the active driver while it specializes and compiles a launch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


# ptxas's log of every kernel compiled in this process, by kernel hash (a kernel Triton already holds in memory is
# not compiled again, so its log must outlive one report() call).
_PTXAS_LOGS: dict[str, str] = {}


@dataclass
class _Launch:
    fn: object
    kernel: object
    grid: tuple[int, ...]
    consts: dict


@contextlib.contextmanager
def _captured_launches(arch: int, launches: list[_Launch], ptxas_logs: dict) -> Iterator[None]:
    """Every ``kernel[grid](...)`` inside compiles for ``arch`` through Triton's own JIT (exact argument
    specialization) and is recorded instead of launched. A tile over the card's shared memory raises
    OutOfResources, as its launch would on the GPU, so untuned launchers fall through to the next tile."""
    from triton import knobs
    from triton.runtime import driver
    from triton.runtime.errors import OutOfResources
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        if log.getvalue():
            ptxas_logs[kernel.hash] = log.getvalue()
        meta = {**dict(zip(self.arg_names, args)), **kwargs}
        dims = tuple(grid(meta) if callable(grid) else grid)
        launches.append(_Launch(self, kernel, dims, {k: v for k, v in meta.items() if _is_scalar(v)}))
        if kernel.metadata.shared > SHARED_LIMIT:
            raise OutOfResources(kernel.metadata.shared, SHARED_LIMIT, "shared memory")
        return kernel

    saved = (knobs.nvidia.dump_ptxas_log, knobs.cache.dir, driver._active)
    with tempfile.TemporaryDirectory() as cache:
        # A fresh cache: every kernel is compiled here, so ptxas runs and its log is captured.
        knobs.nvidia.dump_ptxas_log, knobs.cache.dir = True, cache
        driver.set_active(_StandInDriver(arch))
        JITFunction.run = run
        try:
            yield
        finally:
            JITFunction.run = original_run
            knobs.nvidia.dump_ptxas_log, knobs.cache.dir, driver._active = saved  # no GPU driver to reset to


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, bool, str)) or v is None


def _call(shape: Shape, text: bool, rope: bool, dtype: torch.dtype, arch: int, deterministic: bool = False) -> None:
    """One forward + backward of the Triton backend on never-touched CPU tensors of ``shape``."""
    from ...ops import attention as attn
    from ...ops.rope import rope_freqs
    from ...triton.attention import launch as kernels

    T, B = sum(shape.lens), len(shape.lens)
    H, Hk, D = shape.heads, shape.kv_heads, shape.head_dim

    def empty(*size):
        return torch.empty(size, dtype=dtype).requires_grad_()

    cu = torch.tensor([0, *torch.tensor(shape.lens).cumsum(0).tolist()], dtype=torch.int32)
    extra = {}
    if text:
        extra = dict(
            text_k=empty(B * TEXT_TOKENS, Hk, D), text_v=empty(B * TEXT_TOKENS, Hk, D),
            text_cu_seqlens=torch.arange(B + 1, dtype=torch.int32) * TEXT_TOKENS, text_max_seqlen=TEXT_TOKENS,
            gate=torch.zeros(H, dtype=dtype).requires_grad_(),
        )  # fmt: skip
    if rope:
        extra["freqs"] = rope_freqs(D, torch.cat([torch.arange(n) for n in shape.lens]))
    with kernels.assume_capability(divmod(arch, 10)):
        out = attn._varlen_attention_triton(empty(T, H, D), empty(T, Hk, D), empty(T, Hk, D), cu, max(shape.lens),
                                            1 / math.sqrt(D), deterministic=deterministic, **extra)  # fmt: skip
        out.backward(torch.empty_like(out))


# ----------------------------------------------------------------------------------------------------------------
# Reading a compiled kernel
# ----------------------------------------------------------------------------------------------------------------

_BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+(?:`?\(?)(0x[0-9a-f]+)")


def _innermost_loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) addresses of the SASS loops (a backward branch) that contain no other loop."""
    loops = []
    for addr, ins in instrs:
        m = _BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    return [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]


def _loop_bodies(instrs: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    return [[x for x in instrs if lo <= x[0] <= hi] for lo, hi in _innermost_loops(instrs)]


def _main_loop(instrs: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The instructions of the innermost loop with the most tensor-core ops, the last of equals (the forward's
    self-key loop comes after its text-key loop): the hot loop."""
    hgmma = lambda body: count_classes(body)["hgmma"]
    return max(_loop_bodies(instrs), key=lambda body: (hgmma(body), body[0][0]), default=[])


def _ttgir_dots(ttgir: str) -> tuple[int, int]:
    """(dots in the innermost scf.for with the most dots, dots in the kernel), counted in the TTGIR."""
    is_dot = re.compile(r"= (?:ttng\.warp_group_dot|tt\.dot|ttng\.tc_gen5_mma) ")
    lines = ttgir.splitlines()
    loops, stack = [], []
    depth = 0
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            stack.append((depth, i))
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][0]:
            loops.append((stack.pop()[1], i))
    innermost = [a for a in loops if not any(b != a and a[0] < b[0] and b[1] <= a[1] for b in loops)]
    per_loop = [sum(1 for line in lines[lo:hi] if is_dot.search(line)) for lo, hi in innermost]
    return max(per_loop, default=0), sum(1 for line in lines if is_dot.search(line))


def _partitions(ttgir: str, ptx: str, num_warps: int, regs: int | None) -> list[dict]:
    """The warp-specialized partitions of a kernel: the default partition (the launch's warps, from the final
    TTGIR) and each worker partition of a ``ttg.warp_specialize`` (its warps and the registers it asks for with
    setmaxnreg; None when the op asks none). The default partition's registers: on a warp-specialized kernel, the
    ``setmaxnreg.dec`` its warps run before the default region (the first one in the PTX, after the entry's
    ``setmaxnreg.inc``); else ptxas's allocation. A kernel without warp specialization is one default partition."""
    own_warps = re.search(r'"ttg.num-warps" = (\d+)', ttgir)  # the default partition's (the launch's: all of them)
    default = {"name": "default", "warps": int(own_warps.group(1)) if own_warps else num_warps, "registers": regs}
    if "ttg.warp_specialize" not in ttgir:
        return [default]
    setmaxnreg = re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)
    if len(setmaxnreg) >= 2 and setmaxnreg[0][0] == "inc" and setmaxnreg[1][0] == "dec":
        default["registers"] = int(setmaxnreg[1][1])
    requested = re.search(r"requestedRegisters = array<i32: ([\d, ]+)>", ttgir)
    reg_list = [int(x) for x in requested.group(1).split(",")] if requested else []
    workers = [int(w) for w in re.findall(r"^\s*partition\d+\(.*num_warps\((\d+)\)", ttgir, re.M)]
    return [default] + [
        {"name": f"partition{i}", "warps": w, "registers": reg_list[i] if i < len(reg_list) else None}
        for i, w in enumerate(workers)
    ]


def _loop_structure(body: list[tuple[int, str]]) -> dict:
    """What one innermost SASS loop does per iteration: the keys of the report's structure table."""
    c = count_classes(body)
    cta, named = barriers(body)
    waits = wgmma_waits(body)
    return {
        "first": hex(body[0][0]), "instrs": c["instrs"], "wgmma": c["hgmma"], "wgmma_shapes": wgmma_shapes(body),
        # The deepest wait: with waits [1] one group stays in flight; [0, 1] still drains to zero once.
        "wgmma_wait_pending": max(waits) if waits else None, "wgmma_waits": waits,
        "cta_barriers": cta, "named_barriers": named, "tma_loads": c["tma_load"], "cp_async": c["cp_async"],
        "global_16B": c["ld128"] + c["st128"], "global_2B": c["ld16b"] + c["st16b"], "mma_sync": c["mma_sync"],
        "spill_accesses": c["local"], "ex2": c["ex2"], "atomics": c["atomic"],
    }  # fmt: skip


def _working_loops(instrs: list[tuple[int, str]]) -> list[dict]:
    """_loop_structure of each innermost loop that computes or moves tensors (not the spin loops of mbarrier
    waits and register hand-offs)."""
    keys = ("wgmma", "mma_sync", "tma_loads", "cp_async", "global_16B", "global_2B", "spill_accesses", "ex2")
    loops = [_loop_structure(body) for body in _loop_bodies(instrs)]
    return [loop for loop in loops if any(loop[k] for k in keys)]


def _ptxas(log: str) -> tuple[int | None, int | None, int | None]:
    regs = re.findall(r"Used (\d+) registers", log)
    stores = re.findall(r"(\d+) bytes spill stores", log)
    loads = re.findall(r"(\d+) bytes spill loads", log)
    first = lambda xs: int(xs[0]) if xs else None
    return first(regs), first(stores), first(loads)


def _config(consts: dict, kernel) -> str:
    tiles = "x".join(str(consts[k]) for k in ("BLOCK_M", "BLOCK_N") if k in consts)
    label = f"{tiles}/w{kernel.metadata.num_warps}/s{kernel.metadata.num_stages}"
    return label + (" TMA" if consts.get("TMA") else "")


def _useful_programs(name: str, consts: dict, shape: Shape, text: bool) -> int | None:
    """Programs of an attention kernel's grid whose tile holds at least one token (None for token-parallel
    kernels, whose every program has work)."""
    q_tiles = lambda block: sum(math.ceil(n / block) for n in shape.lens)
    if "BLOCK_M" in consts and name in ("_fwd_kernel", "_bwd_dq"):
        return q_tiles(consts["BLOCK_M"]) * shape.heads
    if "BLOCK_N" in consts and name == "_bwd_dkdv":
        text_tiles = len(shape.lens) * math.ceil(TEXT_TOKENS / consts["BLOCK_N"]) if text else 0
        return (q_tiles(consts["BLOCK_N"]) + text_tiles) * shape.kv_heads
    return None


def _row(shape: Shape, text: bool, rope: bool, launch: _Launch, logs: dict) -> Row:
    kernel, name = launch.kernel, launch.fn.__name__
    row = Row(shape.name, shape.head_dim, text, rope, name, _config(launch.consts, kernel))
    row.regs, row.spill_stores, row.spill_loads = _ptxas(logs.get(kernel.hash, ""))
    row.shared = kernel.metadata.shared
    row.fits = row.shared <= SHARED_LIMIT
    row.grid = launch.grid
    row.programs = math.prod(launch.grid)
    row.useful_programs = _useful_programs(name, launch.consts, shape, text)
    instrs = instructions(sass(kernel.asm["cubin"]))
    row.kernel_counts = count_classes(instrs)
    row.loop_counts = count_classes(_main_loop(instrs))
    row.local_in_loops = sum(count_classes(body)["local"] for body in _loop_bodies(instrs))
    row.loop_dots, row.kernel_dots = _ttgir_dots(kernel.asm["ttgir"])
    _add_structure(row, launch.fn, kernel, instrs, logs.get(kernel.hash, ""))
    return row


def _add_structure(row: Row, fn, kernel, instrs: list[tuple[int, str]], log: str) -> None:
    """Engine, partitions and per-loop structure of a compiled kernel (the report's structure table)."""
    row.engine = "gluon" if "gluon" in type(fn).__module__ else "triton"
    ptx = kernel.asm.get("ptx", "")
    row.partitions = _partitions(kernel.asm["ttgir"], ptx, kernel.metadata.num_warps, row.regs)
    row.loops = _working_loops(instrs)
    row.ptx_wgmma_waits = sorted({int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})
    row.ptxas_notes = sorted(
        {m.strip() for m in re.findall(r"Potential Performance Loss: ([^\n]*?)(?: in the function|\n)", log)}
    )


def report(
    head_dims=(64, 72, 96, 128, 256),
    arch: int = 90,
    all_configs: bool = False,
    variants=None,
    dtype=torch.bfloat16,
    deterministic: bool = False,
) -> list[Row]:
    """One Row per kernel launched by forward + backward at each head dim's benchmark shape, for every
    (text, rope) in ``variants`` (default: all four); ``deterministic`` takes the ordered backward."""
    from ...triton.attention import launch as kernels

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    variants = variants or [(t, r) for t in (False, True) for r in (False, True)]
    rows: list[Row] = []
    logs = _PTXAS_LOGS
    with kernels.autotune_mode("compile" if all_configs else "0"):
        for d in head_dims:
            shape = SHAPES[d]
            for text, rope in variants:
                launches: list[_Launch] = []
                with _captured_launches(arch, launches, logs):
                    _call(shape, text, rope, dtype, arch, deterministic)
                # A kernel launched twice alike in one call (the offsets repair, forward and backward) is one row.
                unique = {(launch.kernel.hash, launch.grid): launch for launch in launches}
                rows.extend(_row(shape, text, rope, launch, logs) for launch in unique.values())
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------

_COLUMNS = (
    "Dh", "text", "rope", "kernel", "tile/warps/stages", "regs", "spill B", "smem KB", "loop instrs", "dots",
    "wgmma", "cp.async", "TMA", "LDG/STG.128", "2-byte ld/st", "local ld/st (all loops)", "atomics",
    "programs (empty)",
)  # fmt: skip


def gluon_report(head_dims=(64, 72, 96, 128), arch: int = 90, texts=(False, True), dtype=torch.bfloat16) -> list[Row]:
    """One Row per Gluon forward config at each head dim's benchmark shape it supports (triton/attention/gluon_fwd.py;
    a head dim it does not take has no row), with and without text. RoPE does not change the Gluon kernel (q
    and k are rotated before it), so it has no variant here."""
    from ...triton.attention import gluon_fwd as gluon_fwd

    rows: list[Row] = []
    for d in head_dims:
        shape = SHAPES[d]
        T, B, H, Hk = sum(shape.lens), len(shape.lens), shape.heads, shape.kv_heads
        q, k, v = (torch.empty(T, h, d, dtype=dtype) for h in (H, Hk, Hk))
        if not gluon_fwd.supported(q, k, v):
            continue
        cu = torch.tensor([0, *torch.tensor(shape.lens).cumsum(0).tolist()], dtype=torch.int32)
        for text in texts:
            tk, tv = (torch.empty(B * TEXT_TOKENS, Hk, d, dtype=dtype) for _ in range(2)) if text else (k, v)
            tcu = torch.arange(B + 1, dtype=torch.int32) * TEXT_TOKENS if text else cu
            out, ot = torch.empty_like(q), torch.empty_like(q)
            lse, lt = torch.empty(H, T), torch.empty(H, T)
            for config in gluon_fwd.CONFIGS[d]:
                launches: list[_Launch] = []
                with _captured_launches(arch, launches, _PTXAS_LOGS):
                    gluon_fwd.launch(config, q, k, v, tk, tv, torch.zeros(H), out, ot, lse, lt, cu, tcu, 0.1, 0.1, T,
                                     H // Hk, B, text, 132)  # fmt: skip
                for launch in launches:
                    row = _row(shape, text, False, launch, _PTXAS_LOGS)
                    row.config = str(config)
                    _add_warp_votes(row, instructions(sass(launch.kernel.asm["cubin"])))
                    rows.append(row)
    return rows


# Tile-sparse attention (issue 27): a video latent packed tile-major (the kernels compile the same at any length).
SPARSE_VIDEO = (16, 8, 64, 112)  # (C, F, H, W): 8 frames of 32 x 56 patches, 14,599 tokens
SPARSE_TILE = (4, 8, 8)


def sparse_report(
    head_dims=(128,), arch: int = 90, texts=(False, True), dtype=torch.bfloat16, deterministic: bool = False
) -> list[Row]:
    """One Row per kernel a tile-sparse forward + backward launches (SPARSE=True) on a tile-major video pack,
    H32, untuned default tiles: a window pattern (one list for every head, ``list_heads`` = 1, a specialized
    constant) and the same lists per head (what top_k gives: ``list_heads`` = H, a run-time value)."""
    from ...ops import attention as attn
    from ...ops.packing import pack
    from ...ops.tile_sparsity import TileBlocks, TileSparsity, tile_sparse_blocks
    from ...triton.attention import launch as kernels

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    packed = pack([torch.zeros(SPARSE_VIDEO)], 2, tile=SPARSE_TILE)
    T, H = packed.kind.shape[0], 32
    empty_qk = torch.empty(T, 1, 16)  # a window reads no values
    window = tile_sparse_blocks(empty_qk, empty_qk, packed.cu_seqlens, packed.tiles, TileSparsity(window=(1, 3, 3)))
    per_head = TileBlocks(window.keys.expand(H, -1, -1).contiguous(), window.counts.expand(H, -1).contiguous(),
                          window.density)  # fmt: skip
    rows: list[Row] = []
    with kernels.autotune_mode("0"):
        for d in head_dims:
            for text in texts:
                for label, blocks in (("window", window), ("per-head lists", per_head)):
                    shape = Shape(f"video {T} tok tile {SPARSE_TILE} H{H}, {label}", (T,), H, H, d)
                    empty = lambda *size: torch.empty(size, dtype=dtype).requires_grad_()
                    extra = {}
                    if text:
                        extra = dict(
                            text_k=empty(TEXT_TOKENS, H, d),
                            text_v=empty(TEXT_TOKENS, H, d),
                            text_cu_seqlens=torch.tensor([0, TEXT_TOKENS], dtype=torch.int32),
                            text_max_seqlen=TEXT_TOKENS,
                            gate=torch.zeros(H, dtype=dtype).requires_grad_(),
                        )
                    launches: list[_Launch] = []
                    with _captured_launches(arch, launches, _PTXAS_LOGS), kernels.assume_capability(divmod(arch, 10)):
                        out = attn._varlen_attention_triton(
                            empty(T, H, d),
                            empty(T, H, d),
                            empty(T, H, d),
                            packed.cu_seqlens,
                            packed.max_seqlen,
                            1 / math.sqrt(d),
                            deterministic=deterministic,
                            tiles=packed.tiles,
                            blocks=blocks,
                            **extra,
                        )
                        out.backward(torch.empty_like(out))
                    unique = {(launch.kernel.hash, launch.grid): launch for launch in launches}
                    rows.extend(_row(shape, text, False, launch, _PTXAS_LOGS) for launch in unique.values()
                                if launch.consts.get("SPARSE"))  # fmt: skip
    return rows


def _add_warp_votes(row: Row, instrs: list[tuple[int, str]]) -> None:
    """``warp_votes`` per working loop of a Gluon row: the VOTE.ANY of the lazy rescale's warp-uniform skip
    (gluon_fwd._rescale), one per consumer key loop when ptxas kept the branch."""
    bodies = {hex(body[0][0]): body for body in _loop_bodies(instrs)}
    for loop in row.loops:
        body = bodies[loop["first"]]
        loop["warp_votes"] = sum(1 for _, text in body if re.match(r"VOTE\.ANY\s+P", text))


def _partition_text(parts: list[dict]) -> str:
    return " + ".join(f"{p['warps']}w/{p['registers'] if p['registers'] is not None else '?'}r" for p in parts)


_STRUCTURE_COLUMNS = (
    "Dh", "text", "rope", "kernel", "engine", "config", "partitions (warps/regs)", "loop", "wgmma (shapes)",
    "wgmma wait", "CTA bar (named)", "TMA", "cp.async", "16B/2B global", "mma.sync", "spill", "EX2",
)  # fmt: skip


def structure_markdown(rows: list[Row]) -> str:
    """The structure table: one line per working inner loop of each kernel (partitions: default first, then the
    workers of a warp-specialized kernel; wgmma wait: the deepest, 0 = waited to zero, with the PTX's depths
    when ptxas serialized them)."""
    lines = ["| " + " | ".join(_STRUCTURE_COLUMNS) + " |", "|" + " --- |" * len(_STRUCTURE_COLUMNS)]
    for r in rows:
        for i, loop in enumerate(r.loops or [{}]):
            shapes = ", ".join(f"{n}x {s}" for s, n in loop.get("wgmma_shapes", {}).items())
            wait = loop.get("wgmma_wait_pending")
            wait_text = "" if wait is None else str(wait)
            if wait is not None and r.ptxas_notes:
                wait_text += f" (PTX waits {r.ptx_wgmma_waits}; ptxas serialized the wgmmas)"
            cells = [
                r.head_dim, "y" if r.text else "", "y" if r.rope else "", r.kernel, r.engine, r.config,
                _partition_text(r.partitions), f"{i + 1}/{len(r.loops)} @{loop['first']}" if loop else "none",
                f"{loop.get('wgmma', 0)}" + (f" ({shapes})" if shapes else ""), wait_text,
                f"{loop.get('cta_barriers', 0)} ({loop.get('named_barriers', 0)})", loop.get("tma_loads", 0),
                loop.get("cp_async", 0), f"{loop.get('global_16B', 0)}/{loop.get('global_2B', 0)}",
                loop.get("mma_sync", 0), loop.get("spill_accesses", 0), loop.get("ex2", 0),
            ]  # fmt: skip
            lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[Row]) -> str:
    """The report as a Markdown table (loop columns: the kernel's main loop). A tile over the card's shared
    memory is listed (the launcher tried it) and marked: it does not launch, the next tile does."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
    for r in rows:
        c = r.loop_counts
        empty = "" if r.useful_programs is None else f" ({r.programs - r.useful_programs})"
        spill = "?" if r.spill_stores is None else str(r.spill_stores)
        cells = [
            r.head_dim, "y" if r.text else "", "y" if r.rope else "", r.kernel,
            r.config if r.fits else f"{r.config} (over smem: not launched)", r.regs or "?", spill,
            f"{r.shared / 1024:.0f}", c.get("instrs", 0), r.loop_dots, c.get("hgmma", 0), c.get("cp_async", 0),
            c.get("tma_load", 0), f"{c.get('ld128', 0)}/{c.get('st128', 0)}",
            f"{c.get('ld16b', 0)}/{c.get('st16b', 0)}", f"{c.get('local', 0)} ({r.local_in_loops})", c.get("atomic", 0),
            f"{r.programs}{empty}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagdit-bench compile-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    parser.add_argument("--head-dims", default="64,72,96,128,256", help="comma-separated, from " + str(list(SHAPES)))
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the default")
    parser.add_argument("--deterministic", action="store_true", help="the deterministic backward (separate dq)")
    parser.add_argument("--no-rope", action="store_true", help="skip the RoPE variants (same attention kernels)")
    parser.add_argument("--gluon", action="store_true", help="also the Gluon forward (triton/attention/gluon_fwd.py)")
    parser.add_argument("--sparse", action="store_true", help="also the tile-sparse kernels (SPARSE=True, issue 27)")
    parser.add_argument("--json", metavar="PATH", help="write every row as JSON")
    parser.add_argument("--md", metavar="PATH", help="write the Markdown table here instead of stdout")
    args = parser.parse_args(argv)
    import triton

    head_dims = tuple(int(d) for d in args.head_dims.split(",") if d)
    variants = [(text, False) for text in (False, True)] if args.no_rope else None
    rows = report(head_dims, args.arch, args.all_configs, variants, deterministic=args.deterministic)
    if args.gluon:
        rows += gluon_report(head_dims, args.arch)
    if args.sparse:
        rows += sparse_report(tuple(d for d in head_dims if d in (64, 72, 128)) or (128,), args.arch,
                              deterministic=args.deterministic)  # fmt: skip
    table = markdown(rows) + "\nStructure (per working inner loop)\n\n" + structure_markdown(rows)
    default = "default backward (sm_90, Triton 3.6 / 3.9: warp-specialized dk/dv and dq kernels; else dq by atomics)"
    path = "deterministic backward" if args.deterministic else default
    header = f"Triton {triton.__version__}, sm_{args.arch}, bf16, torch {torch.__version__}, {path}\n\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(header + table)
    else:
        print(header + table, end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "arch": args.arch, "rows": [asdict(r) for r in rows]}, f,
                      indent=1)  # fmt: skip
    return 0
