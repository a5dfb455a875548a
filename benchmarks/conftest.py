"""pytest-benchmark suites over the cases in ``flagdit_kernels.bench``.

``pytest benchmarks/ --benchmark-only`` times every op x implementation (full DiT shapes on GPU, small
shapes on CPU); ``--bench-quick`` / ``--bench-full`` force the size. With ``--benchmark-disable`` every case
runs once, which is how CI keeps the suites from rotting.
"""

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("flagdit")
    group.addoption("--bench-quick", action="store_true", help="small shapes even on GPU")
    group.addoption("--bench-full", action="store_true", help="DiT-sized shapes even on CPU")
    group.addoption("--bench-device", default=None, help="cuda or cpu (default: cuda when available)")
    group.addoption("--bench-families", default=None, help="comma-separated op families (default: all)")


def bench_families(config) -> tuple[str, ...]:
    from flagdit_kernels.bench.cases import family_names

    known = family_names()
    chosen = tuple(f for f in (config.getoption("--bench-families") or ",".join(known)).split(",") if f)
    unknown = set(chosen) - set(known)
    if unknown:
        raise pytest.UsageError(f"--bench-families: unknown {sorted(unknown)}; choose from {known}")
    return chosen


def bench_settings(config) -> tuple[torch.device, bool]:
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = config.getoption("--bench-quick") or (device.type == "cpu" and not config.getoption("--bench-full"))
    return device, quick


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    return bench_settings(request.config)[0]
