"""Builds a C++ test shim (tests/support/cuda_emulation/*.cpp, compiled against csrc/) into a shared library that tests
call through ctypes; skips the test where no C++ compiler is installed."""

from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def build_shim(tmp_path_factory, source: str) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip(f"no C++ compiler to build {source}")
    src = ROOT / "tests" / "support" / "cuda_emulation" / source
    lib = tmp_path_factory.mktemp("shim") / f"{src.stem}.so"
    flags = ["-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", f"-I{ROOT / 'csrc'}"]
    subprocess.run([cxx, *flags, str(src), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))
