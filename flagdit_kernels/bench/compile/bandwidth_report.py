"""What the bandwidth kernels (RMSNorm family, RoPE / QK-norm, packing, embedding) compile to for sm_90, without
a GPU, specialized exactly as real launches would be.

Without a GPU the compile is the measurement. The host launchers of ``flagdit_kernels/triton/{norms,rope,
packing,embed}.py`` run on CPU tensors with their kernels recorded (``recorder.recording``), and every recorded
launch is compiled through Triton's own argument binder (``recorder.compile_launch``). The report gives, per
launch: warps, registers, local memory (spills), shared memory, the resident programs per SM that follow on an
H100/H200, and the global loads and stores in the SASS by width (16-byte vectors vs narrower accesses).

Run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled)::

    flagdit-bench bandwidth-report                  # every family, default shapes
    flagdit-bench bandwidth-report norms rope       # some families
    PYTHONPATH=/path/to/triton-3.6:$PWD python -m flagdit_kernels.bench bandwidth-report   # another Triton

The tests ``test_*_compile*.py`` use the same recorder to check that these kernels compile at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch

from .recorder import H200, Launch, compile_launch, recording
from .sass import access_widths, instructions, resource_usage, sass


def _widths(counter: Counter) -> str:
    return " ".join(f"{w}x{counter[w]}" for w in ("16B", "8B", "4B", "2B", "1B") if counter[w]) or "-"


def describe(launch: Launch, arch: int = 90) -> str:
    """One line on what the launch compiles to: grid, warps, registers, spills, shared memory, residency on an
    H200, global accesses by width and the SASS length."""
    from ...triton import _helpers

    compiled = compile_launch(launch, arch)
    res = resource_usage(compiled.asm["cubin"])
    warps = compiled.metadata.num_warps
    shared = compiled.metadata.shared
    text = sass(compiled.asm["cubin"])
    widths = access_widths(text)
    blocks = _helpers.programs_per_sm(H200, res["REG"], warps, shared)
    grid = "x".join(str(g) for g in launch.grid)
    return (
        f"{launch.label}: grid {grid}, warps {warps}, regs {res['REG']}, local {res['LOCAL']} B, shared {shared} B,"
        f" {blocks}/SM ({blocks * warps} warps), LDG {_widths(widths['LDG'])}, STG {_widths(widths['STG'])},"
        + (f" cp.async {_widths(widths['LDGSTS'])}," if widths["LDGSTS"] else "")
        + f" {len(instructions(text))} SASS"
    )


# ------------------------------------------------------------------------------------------------ families
# Each returns the launches of representative calls, recorded from the real host launchers on CPU tensors.


def norm_launches() -> list[Launch]:
    from ...triton import norms as K

    dt = torch.bfloat16
    names = ("_fwd_kernel", "_bwd_kernel", "_segment_sum_kernel")
    launches: list[Launch] = []
    for d in (2304, 4096):
        rows = 32768  # the benchmark shape, so grids and rows per program are those of a real run
        x = torch.empty(rows, d, dtype=dt)
        w = torch.empty(d, dtype=dt)
        with recording(K, names, lambda n, d=d: f"rms_norm {n} D{d}") as rec:
            _, rstd = K.forward(x, w, 1e-5)
            K.backward(x, x, w, rstd)
        launches += rec
        cu = torch.linspace(0, rows, 9).round().to(torch.int32)
        scale = torch.empty(8, d, dtype=dt)
        with recording(K, names, lambda n, d=d: f"modulate packed {n} D{d}") as rec:
            _, rstd = K.forward(x, w, 1e-5, mode=K.MODE_MODULATE, p1=scale, p2=scale, cu_seqlens=cu)
            K.backward(x, x, w, rstd, mode=K.MODE_MODULATE, p1=scale, p2=scale, cu_seqlens=cu)
        launches += rec
        with recording(K, names, lambda n, d=d: f"gated packed {n} D{d}") as rec:
            _, rstd = K.forward(x, w, 1e-5, mode=K.MODE_GATED, p1=scale, residual=x, cu_seqlens=cu)
            K.backward(x, x, w, rstd, mode=K.MODE_GATED, p1=scale, cu_seqlens=cu)
        launches += rec
        # layer_norm_modulate as DiT final layers call it: no affine, per-sample shift and scale.
        layer = dict(norm=K.NORM_LAYER, mode=K.MODE_MODULATE, p1=scale, p2=scale, cu_seqlens=cu)
        with recording(K, names, lambda n, d=d: f"layer modulate packed {n} D{d}") as rec:
            _, rstd = K.forward(x, None, 1e-6, **layer)
            K.backward(x, x, None, rstd, **layer)
        launches += rec
    return launches


def rope_launches() -> list[Launch]:
    from ...triton import rope as K

    dt = torch.bfloat16
    names = ("_rope_kernel", "_qk_norm_rope_fwd_kernel", "_qk_norm_rope_bwd_kernel")
    launches: list[Launch] = []
    tokens = 16640  # the benchmark's packed batch, so loop trip counts are not specialized away
    for h, hk, dh in ((32, 32, 128), (32, 8, 72)):
        f = torch.empty(tokens, dh // 2, 2)
        qkv = torch.empty(tokens, h + 2 * hk, dh, dtype=dt)  # q, k as views of a fused projection
        q, k = qkv[:, :h], qkv[:, h : h + hk]
        for norm in ("layer_norm", "rms_norm"):
            wq = h * dh if norm == "layer_norm" else dh
            wk = hk * dh if norm == "layer_norm" else dh
            ps = (torch.empty(wq), torch.empty(wq), torch.empty(wk), torch.empty(wk))
            with recording(K, names, lambda n, norm=norm, dh=dh: f"{n} {norm} Dh{dh}") as rec:
                if norm == "layer_norm":
                    K.apply_rope(q, f, True)
                K.qk_norm_rope_fwd(q, k, f, *ps, norm, 1e-5, True)
                K.qk_norm_rope_bwd(q, k, q, k, f, *ps, norm, 1e-5, True)
            launches += rec
    return launches


def packing_launches() -> list[Launch]:
    from ..._conventions import frames_hw, item_shapes
    from ...triton import embed as E
    from ...triton import packing as K

    dt = torch.bfloat16
    launches: list[Launch] = []
    shapes = [(16, 128, 128), (16, 64, 192), (16, 5, 64, 64)]
    latents = [torch.empty(s, dtype=dt) for s in shapes]
    fhw = [frames_hw(s) for s in shapes]
    items = item_shapes(shapes)
    with recording(K, ("pack_kernel", "unpack_kernel"), lambda n: f"{n} C16 p2") as rec:
        patches = K.pack(latents, fhw, 2, True, True, False, with_layout=True)[0]
        K.pack(latents, fhw, 2, True, True, True, with_layout=False)
        K.unpack(patches, items, 2, 16, True, True, True)
        K.unpack(patches, items, 2, 16, True, True, False)
    launches += rec
    shapes = [(4, 32, 32), (4, 3, 16, 16)]
    latents = [torch.empty(s, dtype=dt) for s in shapes]
    with recording(K, ("pack_kernel", "unpack_kernel"), lambda n: f"{n} C4 p2") as rec:
        patches = K.pack(latents, [frames_hw(s) for s in shapes], 2, True, True, False, with_layout=True)[0]
        K.unpack(patches, item_shapes(shapes), 2, 4, True, True, True)
    launches += rec
    out = torch.empty(4096, 2304, dtype=dt)
    with recording(E, ("placeholder_rows_kernel",), lambda n: f"{n} dim2304") as rec:
        E.write_placeholder_rows(out, torch.zeros(4096, dtype=torch.int8), torch.empty(2, 2304, dtype=dt))
    launches += rec
    return launches


FAMILIES = {"norms": norm_launches, "rope": rope_launches, "packing": packing_launches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flagdit-bench bandwidth-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("families", nargs="*", help="some of " + str(list(FAMILIES)) + " (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    print(f"triton {triton.__version__}, sm_90")
    for family in args.families or FAMILIES:
        for launch in FAMILIES[family]():
            print(describe(launch), flush=True)
    return 0
