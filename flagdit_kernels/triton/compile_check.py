"""Compiles the varlen attention kernels for an NVIDIA target without a GPU and reports registers / spills.

Triton's NVIDIA backend and its bundled ptxas lower a kernel all the way to a cubin on any machine, so layout,
constexpr and shape errors that the CPU interpreter never sees show up here. Run it without TRITON_INTERPRET
(under the interpreter ``triton.jit`` builds interpreter objects that cannot be compiled)::

    python -m flagdit_kernels.triton.compile_check            # sm_90, every variant, one line each
    python -m flagdit_kernels.triton.compile_check --all-configs --head-dims 64,72,96,128,256

Strides of the head dim are compiled as the constant 1 and pointers / token strides as multiples of 16, which is
what the JIT specializes for contiguous or fused-QKV tensors at run time. This checks the Triton installed here
(the GPU machine may run an older one); it does not time anything.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import varlen_attention as va

_FP32_POINTERS = {"LSE", "LSE_T", "DELTA", "DELTA_T", "R", "TGATE", "FREQS"}
_INT_POINTERS = {"CU", "TCU", "CU_K"}
_INT_SCALARS = {"T", "GROUP", "text_max_seqlen"}


def _source(fn, dtype: str, constexprs: dict) -> ASTSource:
    consts = dict(constexprs)
    for name in fn.arg_names:
        if name.startswith("stride_") and (name.endswith("d") or name == "stride_fc"):
            consts[name] = 1
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name.isupper() and name not in _INT_SCALARS:
            kind = "fp32" if name in _FP32_POINTERS else "i32" if name in _INT_POINTERS else dtype
            signature[name] = "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif "scale" in name:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and name != "stride_fi":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, consts, attrs)


def _ptxas_report(ptx: str, arch: int) -> str:
    """'regs N, spills B' from the bundled ptxas, or '' when it cannot be run."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for exe in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bindir, exe)
        if not os.path.exists(path):
            continue
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            res = subprocess.run(
                [path, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True,
                text=True,
            )
        if res.returncode == 0:
            regs = re.findall(r"Used (\d+) registers", res.stderr)
            spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
            return f"regs {regs[0] if regs else '?'}, spill stores {spills[0] if spills else '?'} B"
    return ""


def variants(head_dims=(72, 128), all_configs: bool = False) -> list[tuple[str, object, dict, int, int]]:
    """(label, kernel, constexprs, num_warps, num_stages) for every kernel variant: with the untuned default
    config (the first that fits the head dim), or with every config the autotuner may try."""
    out = []

    def add(label, kernel, configs, consts):
        fitting = va._prune(configs, consts)
        for config in fitting if all_configs else fitting[:1]:
            tiles = config.kwargs
            name = f"{label} {tiles['BLOCK_M']}x{tiles['BLOCK_N']}/w{config.num_warps}/s{config.num_stages}"
            name += " TMA" if tiles.get("TMA") else ""
            out.append((name, kernel, dict(consts, **tiles), config.num_warps, config.num_stages))

    for d in head_dims:
        common = dict(HEAD_DIM=d, **va._chunks(d), DOT_PREC="tf32")
        for rope in (False, True):
            fwd = dict(common, HAS_TEXT=True, ROPE=rope, TMA_OK=True)
            add(f"fwd D{d} text rope={rope}", va._fwd_kernel, va.FWD_CONFIGS, fwd)
            add(f"dq D{d} text rope={rope}", va._bwd_dq, va.DQ_CONFIGS, dict(fwd))
            for text in (False, True):
                consts = dict(common, HAS_TEXT=text, ROPE=rope)
                add(f"dkdv D{d} text={text} rope={rope}", va._bwd_dkdv, va.DKDV_CONFIGS, consts)
        consts = dict(HEAD_DIM=d, BLOCK_D=va._block_d(d), HAS_TEXT=True, BLOCK_T=64)
        out.append((f"preprocess D{d}", va._bwd_preprocess, consts, 4, 1))
    return out


def compile_all(
    arch: int = 90, head_dims=(72, 128), dtype: str = "bf16", report: bool = True, all_configs: bool = False
) -> list[str]:
    if va.INTERPRETED:
        raise RuntimeError("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    target = GPUTarget("cuda", arch, 32)
    lines = []
    for label, kernel, consts, warps, stages in variants(head_dims, all_configs):
        fn = kernel if isinstance(kernel, triton.runtime.JITFunction) else kernel.fn
        try:
            compiled = triton.compile(
                _source(fn, dtype, consts), target=target, options={"num_warps": warps, "num_stages": stages}
            )
        except Exception as exc:  # reported per variant (the autotuner skips resource errors too)
            lines.append(f"{label}: FAILED {type(exc).__name__}: {str(exc).splitlines()[-1][:160]}")
            continue
        extra = _ptxas_report(compiled.asm["ptx"], arch) if report else ""
        lines.append(f"{label}: ok, shared {compiled.metadata.shared} B" + (f", {extra}" if extra else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flagdit_kernels.triton.compile_check", description=__doc__)
    parser.add_argument("arch", nargs="?", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--head-dims", default="72,128", help="comma-separated head dims")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not just the default")
    args = parser.parse_args(argv)
    head_dims = tuple(int(d) for d in args.head_dims.split(",") if d)
    lines = compile_all(args.arch, head_dims, all_configs=args.all_configs)
    for line in lines:
        print(line, flush=True)
    return int(any(": FAILED" in line for line in lines))


if __name__ == "__main__":
    sys.exit(main())
