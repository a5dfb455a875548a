"""Ahead-of-time sm_90 compiles of the bandwidth kernels, specialized exactly as real launches would be.

Without a GPU the compile is the measurement. The host launchers of ``flagdit_kernels/triton/{rms_norm,rope,
packing,embed}.py`` run on CPU tensors with their kernels swapped for recorders; every recorded launch then
goes through Triton's own argument binder (the JIT's specialization: 16-byte aligned pointers and integers
divisible by 16 get divisibility hints, integers equal to 1 become constants) and is compiled to a cubin by
the ptxas Triton ships. The report gives, per launch: warps, registers, local memory (spills), shared memory,
the resident programs per SM that follow on an H100/H200, and the global loads and stores in the SASS by
width (16-byte vectors vs narrower accesses).

Run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled)::

    python tests/compile_sm90.py                    # every family, default shapes
    python tests/compile_sm90.py norms rope         # some families
    PYTHONPATH=/path/to/triton-3.6:$PWD python tests/compile_sm90.py   # another Triton

The tests ``test_*_compile*.py`` use the same recorder to check that these kernels compile at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# An H200 as the launchers see it: (SMs, registers per SM, threads per SM, shared bytes per SM).
H200 = (132, 65536, 2048, 233472)


@dataclasses.dataclass
class Launch:
    label: str
    fn: object  # the triton JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def recording(module, names: tuple[str, ...], label: Callable[[str], str] | None = None) -> Iterator[list[Launch]]:
    """Swaps ``module.<name>`` kernels for recorders while active, and makes the launchers size persistent
    grids for an H200 (its SM count, and the residency of each variant compiled here); yields the list the
    launches land in."""
    from flagdit_kernels.triton import _helpers

    launches: list[Launch] = []
    saved = {name: getattr(module, name) for name in names}
    saved_limits, saved_resident = _helpers.device_limits, _helpers.resident_programs

    class Recorder:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                tag = label(self.name) if label else self.name
                launches.append(Launch(tag, self.fn, args, kwargs, tuple(grid)))

            return record

        def warmup(self, *args, grid, **kwargs):
            return compile_launch(Launch(self.name, self.fn, args, kwargs, grid))

    def resident(kernel, args, kwargs, limits):
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        regs = cubin_resources(compiled.asm["cubin"])["REG"]
        return _helpers.programs_per_sm(limits, regs, compiled.metadata.num_warps, compiled.metadata.shared)

    try:
        for name, fn in saved.items():
            setattr(module, name, Recorder(name, fn))
        _helpers.device_limits, _helpers.resident_programs = (lambda device: H200), resident
        yield launches
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        _helpers.device_limits, _helpers.resident_programs = saved_limits, saved_resident


def compile_launch(launch: Launch, arch: int = 90):
    """The launch's kernel compiled for ``sm_<arch>`` through the JIT's own binder and specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the (single) kernel in ``cubin`` (cuobjdump -res-usage)."""
    return _res_usage(cubin)[0][1]


def _res_usage(cubin: bytes) -> list[tuple[str, dict[str, int]]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    out, name = [], None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out.append((name, {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}))
            name = None
    return out


def sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True).stdout


_WIDTH = (("128", "16B"), ("64", "8B"), ("U16", "2B"), ("S16", "2B"), ("U8", "1B"), ("S8", "1B"))


def access_widths(sass_text: str) -> dict[str, Counter]:
    """Global memory accesses in the SASS by access width: loads (LDG), stores (STG) and asynchronous copies
    into shared memory (LDGSTS, cp.async): {"LDG": Counter({"16B": n, ...}), "STG": ..., "LDGSTS": ...}."""
    out = {"LDG": Counter(), "STG": Counter(), "LDGSTS": Counter()}
    for op in re.findall(r"\b((?:LDGSTS|LDG|STG)\.E[\w.]*)", sass_text):
        parts = op.split(".")
        width = next((w for suffix, w in _WIDTH if suffix in parts), "4B")
        out[parts[0]][width] += 1
    return out


def sass_instructions(sass_text: str) -> int:
    return len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass_text, flags=re.MULTILINE))


def _widths(counter: Counter) -> str:
    return " ".join(f"{w}x{counter[w]}" for w in ("16B", "8B", "4B", "2B", "1B") if counter[w]) or "-"


def describe(launch: Launch, arch: int = 90) -> str:
    from flagdit_kernels.triton import _helpers

    compiled = compile_launch(launch, arch)
    res = cubin_resources(compiled.asm["cubin"])
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
        + f" {sass_instructions(text)} SASS"
    )


# ------------------------------------------------------------------------------------------------ families
# Each returns the launches of representative calls, recorded from the real host launchers on CPU tensors.


def norm_launches() -> list[Launch]:
    from flagdit_kernels.triton import rms_norm as K

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
    return launches


def rope_launches() -> list[Launch]:
    from flagdit_kernels.triton import rope as K

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
    from flagdit_kernels.ops.packing import _item_shapes
    from flagdit_kernels.reference.packing import frames_hw
    from flagdit_kernels.triton import embed as E
    from flagdit_kernels.triton import packing as K

    dt = torch.bfloat16
    launches: list[Launch] = []
    shapes = [(16, 128, 128), (16, 64, 192), (16, 5, 64, 64)]
    latents = [torch.empty(s, dtype=dt) for s in shapes]
    fhw = [frames_hw(s) for s in shapes]
    items = _item_shapes(shapes)
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
        K.unpack(patches, _item_shapes(shapes), 2, 4, True, True, True)
    launches += rec
    out = torch.empty(4096, 2304, dtype=dt)
    with recording(E, ("placeholder_rows_kernel",), lambda n: f"{n} dim2304") as rec:
        E.write_placeholder_rows(out, torch.zeros(4096, dtype=torch.int8), torch.empty(2, 2304, dtype=dt))
    launches += rec
    return launches


FAMILIES = {"norms": norm_launches, "rope": rope_launches, "packing": packing_launches}


# ------------------------------------------------------------------------------------------------ for tests


def compiler_unavailable() -> str | None:
    """Why kernels cannot be compiled ahead of time here (None when they can)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"this triton has no ahead-of-time compile API: {exc}"
    if torch.cuda.is_available():
        return "on a GPU the kernel tests compile the kernels for real"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
        return "triton's bundled ptxas is missing"
    return None


def run_script(path: str) -> str:
    """Runs a test file as a script without TRITON_INTERPRET (under the interpreter ``@triton.jit`` yields
    functions the compiler cannot take); returns its stdout, asserting it succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
    return done.stdout


def main(argv: list[str]) -> int:
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    families = argv or list(FAMILIES)
    print(f"triton {triton.__version__}, sm_90")
    for family in families:
        for launch in FAMILIES[family]():
            print(describe(launch), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
