"""Reading a cubin without a GPU: its SASS and resource usage from the ``cuobjdump`` Triton ships, and the
instructions in it that tell how a kernel moves memory (global accesses by width, cp.async, TMA, wgmma, spills,
atomics). The compile reports build on these."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")
_GLOBAL_ACCESS = re.compile(r"(LDGSTS|LDG|STG)\.E")
# Opcode modifier -> access width; an access with none of them moves 4 bytes.
_WIDTH = (("128", "16B"), ("64", "8B"), ("U16", "2B"), ("S16", "2B"), ("U8", "1B"), ("S8", "1B"))


def bundled_binary(name: str) -> str:
    """Path of a CUDA binary of Triton's NVIDIA backend (``cuobjdump``, ``nvdisasm``, ``ptxas``), as Triton
    itself resolves it (``TRITON_<NAME>_PATH`` first)."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([bundled_binary("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip


def sass(cubin: bytes) -> str:
    """The SASS listing of ``cubin`` (``cuobjdump -sass``)."""
    return _cuobjdump("-sass", cubin)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL ... of the first kernel in ``cubin`` (``cuobjdump -res-usage``)."""
    in_function = False
    for line in _cuobjdump("-res-usage", cubin).splitlines():
        if re.search(r"Function \S+:", line):
            in_function = True
        elif in_function and "REG:" in line:
            return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    raise ValueError("cuobjdump -res-usage listed no kernel")


def instructions(sass_text: str) -> list[tuple[int, str]]:
    """(address, instruction without its predicate: opcode with modifiers, then operands) of every instruction
    of a SASS listing."""
    out = []
    for line in sass_text.splitlines():
        m = _INSTRUCTION.search(line)
        if m:
            out.append((int(m.group(1), 16), _PREDICATE.sub("", m.group(2).strip())))
    return out


def global_access(opcode: str) -> tuple[str, str] | None:
    """("LDG" load / "STG" store / "LDGSTS" cp.async into shared memory, access width such as "16B") of a global
    memory access; None for any other opcode."""
    m = _GLOBAL_ACCESS.match(opcode)
    if not m:
        return None
    modifiers = opcode.split(".")
    return m.group(1), next((width for suffix, width in _WIDTH if suffix in modifiers), "4B")


def access_widths(sass_text: str) -> dict[str, Counter]:
    """Global memory accesses of a SASS listing by kind and width: {"LDG": Counter({"16B": n, ...}), "STG": ...,
    "LDGSTS": ...}."""
    out = {"LDG": Counter(), "STG": Counter(), "LDGSTS": Counter()}
    for _, instruction in instructions(sass_text):
        access = global_access(instruction.split()[0])
        if access:
            out[access[0]][access[1]] += 1
    return out


def _moves(kinds: tuple[str, ...], widths: tuple[str, ...]) -> Callable[[str], bool]:
    def test(opcode: str) -> bool:
        access = global_access(opcode)
        return access is not None and access[0] in kinds and access[1] in widths

    return test


# Instruction classes, each a test of an opcode with its modifiers.
CLASSES: dict[str, Callable[[str], bool]] = {
    "instrs": lambda op: True,
    "hgmma": lambda op: op.startswith("HGMMA"),  # wgmma
    "cp_async": lambda op: op.startswith("LDGSTS"),
    "tma_load": lambda op: op.startswith("UTMALDG"),
    # 16-byte loads count a cp.async of 16 bytes too: that is how the attention report has always counted them.
    "ld128": _moves(("LDG", "LDGSTS"), ("16B",)),
    "st128": _moves(("STG",), ("16B",)),
    "ld16b": _moves(("LDG", "LDGSTS"), ("2B",)),
    "st16b": _moves(("STG",), ("2B",)),
    "local": lambda op: op.startswith(("LDL", "STL")),
    "mma_sync": lambda op: op.startswith("HMMA"),  # mma.sync: a warp-level tensor-core op (no wgmma)
    "ex2": lambda op: op.startswith("MUFU.EX2"),
    # global reductions / atomics and the copy engine's reduce (not REDUX, a warp reduction, nor shared ATOMS)
    "atomic": lambda op: op.split(".")[0] in ("RED", "REDG", "ATOM", "ATOMG", "UTMAREDG"),
}


def count_classes(instrs: list[tuple[int, str]]) -> dict[str, int]:
    """How many of ``instrs`` (from ``instructions``) fall in each of ``CLASSES``."""
    return {name: sum(1 for _, ins in instrs if test(ins.split()[0])) for name, test in CLASSES.items()}


# ----------------------------------------------------------------------------------------------------------------
# Structure of a loop: wgmma shapes and waits, barriers
# ----------------------------------------------------------------------------------------------------------------

_HGMMA_SHAPE = re.compile(r"^HGMMA\.(\d+x\d+x\d+)")
_DEPBAR = re.compile(r"^WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-f]+|\d+)")
_BARRIER = re.compile(r"^BAR\.(SYNC|RED|ARV)\S*\s+([^,]+)(,\s*\S+)?")


def wgmma_shapes(instrs: list[tuple[int, str]]) -> dict[str, int]:
    """{"64x128x16": n, ...}: the wgmma (HGMMA) instructions of ``instrs`` by M x N x K shape."""
    out: Counter = Counter()
    for _, ins in instrs:
        m = _HGMMA_SHAPE.match(ins)
        if m:
            out[m.group(1)] += 1
    return dict(out)


def wgmma_waits(instrs: list[tuple[int, str]]) -> list[int]:
    """The distinct depths of the wgmma waits in ``instrs`` (``WARPGROUP.DEPBAR.LE gsb0, n``: wait until at most
    n groups are in flight; 0 = waited to zero), ascending."""
    return sorted({int(m.group(1), 0) for _, ins in instrs if (m := _DEPBAR.match(ins))})


def barriers(instrs: list[tuple[int, str]]) -> tuple[int, int]:
    """(CTA-wide barriers, named barriers over part of the CTA) in ``instrs``. ``BAR.SYNC b`` with no thread count
    waits for every thread of the CTA; ``BAR.SYNC b, n`` only for n threads (one warp-specialized partition)."""
    cta = named = 0
    for _, ins in instrs:
        m = _BARRIER.match(ins)
        if m:
            if m.group(3):
                named += 1
            else:
                cta += 1
    return cta, named
