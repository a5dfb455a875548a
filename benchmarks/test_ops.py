"""Every op family x implementation; figures land in each benchmark's ``extra_info``.

``extra_info`` holds the CUDA-event median (``triton.testing.do_bench`` on GPU), GB/s and TFLOP/s from the
case's byte/FLOP floor, their share of the measured copy bandwidth / matmul rate, and the ceilings.
"""

import pytest
import torch
from conftest import bench_families, bench_settings

from flagdit_kernels.bench.cases import all_cases
from flagdit_kernels.bench.timing import copy_bandwidth_gbs, matmul_tflops, throughput, time_ms
from flagdit_kernels.bench.tuning import chosen_tiles


def _params(config):
    device, quick = bench_settings(config)
    params = []
    for case in all_cases(quick, device, bench_families(config)):
        for impl in case.impls:
            params.append(pytest.param(case, impl, id=f"{case.name}-{impl}"))
    return params


def pytest_generate_tests(metafunc):
    if {"case", "impl"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("case", "impl"), _params(metafunc.config))


def test_op(benchmark, case, impl, bench_device):
    benchmark.group = case.name  # ours and the baselines side by side
    fn = case.impls[impl]()
    sync = torch.cuda.synchronize if bench_device.type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    if not benchmark.disabled:
        ms = time_ms(fn, bench_device)
        figures = throughput(case.bytes, case.flops, ms)
        copy, mm = copy_bandwidth_gbs(str(bench_device)), matmul_tflops(str(bench_device))
        benchmark.extra_info.update(
            op=case.op,
            shape=case.shape,
            direction=case.direction,
            impl=impl,
            median_ms=ms,
            GBps=figures["GB/s"],
            TFLOPs=figures["TFLOP/s"],
            pct_of_copy=100 * figures["GB/s"] / copy if figures["GB/s"] else None,
            pct_of_matmul=100 * figures["TFLOP/s"] / mm if figures["TFLOP/s"] else None,
            copy_GBps=copy,
            matmul_TFLOPs=mm,
            device=torch.cuda.get_device_name() if bench_device.type == "cuda" else "cpu",
            prediction=case.prediction or None,
        )
        tiles = chosen_tiles()  # what the autotuner (and the engine chooser) kept so far
        if tiles:
            benchmark.extra_info["tuned_tiles"] = tiles
    benchmark.pedantic(
        run, rounds=10 if not benchmark.disabled else 1, warmup_rounds=1 if not benchmark.disabled else 0
    )
