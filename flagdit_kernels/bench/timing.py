"""Timing and the measured ceilings (copy bandwidth, bf16 matmul rate) that figures are reported against."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch


def time_samples(
    fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100
) -> list[float]:
    """Milliseconds of every timed call: CUDA events via ``triton.testing.do_bench`` on GPU, wall clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return [float(t) for t in triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")]
    fn()
    samples: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 1000):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds per call (see :func:`time_samples`)."""
    return statistics.median(time_samples(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms))


@functools.cache
def copy_bandwidth_gbs(device_str: str) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), GB/s."""
    device = torch.device(device_str)
    # 2 GiB on GPU (far past L2); 128 MiB on CPU (past the last-level cache), read + written.
    n, dtype = ((1 << 30), torch.bfloat16) if device.type == "cuda" else ((1 << 25), torch.float32)
    src = torch.randn(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


@functools.cache
def matmul_tflops(device_str: str) -> float:
    """Measured bf16 matmul rate, TFLOP/s (fp32 on CPU, where bf16 GEMM is emulated)."""
    device = torch.device(device_str)
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def throughput(case_bytes: int, case_flops: int, ms: float) -> dict:
    """GB/s and TFLOP/s of one call that took ``ms``."""
    return {
        "ms": ms,
        "GB/s": case_bytes / ms / 1e6 if case_bytes else None,
        "TFLOP/s": case_flops / ms / 1e9 if case_flops else None,
    }
