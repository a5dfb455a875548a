"""A pytest plugin that appends one JSON line per test to a results log the moment the test finishes.

pytest-benchmark writes ``--benchmark-json`` only when the pytest run ends, so a run stopped by a time limit
leaves nothing; this log keeps everything up to the test in flight. ``benchmarks/gpu_check.sh`` loads it for
the tests and the benchmarks alike (``benchmarks/`` on ``PYTHONPATH``)::

    python -m pytest -p results_log --results-jsonl results.jsonl --results-phase smoke tests/test_smoke.py

Records (one JSON object per line, each with ``kind``, ``phase`` and ``t``, the Unix time):

- ``session``: versions (Python, torch, Triton, CUDA), the device, once per pytest run;
- ``start``: a test begins (its ``test`` id); a ``start`` without a result is the test a kill or crash cut off;
- ``result``: outcome, duration, a one-line message; for a benchmark, its ``extra_info`` (the figures);
- ``autotune``: a Triton autotuner's timings of every config for one tuning key, read from Triton's on-disk
  cache as soon as a benchmark has made it (or found it there from an earlier run);
- ``interrupted``: the run was stopped (SIGINT, as ``timeout -s INT`` sends), with the test in flight.

It imports neither flagdit_kernels nor Triton at load time: ``tests/conftest.py`` sets environment variables
that flagdit_kernels reads on import. ``--results-inflight FILE`` keeps the id of the running test in FILE (the
orchestrator's per-case watchdog reads its age). ``--results-fast-exit`` ends the process as soon as pytest is
done (skipping seconds of interpreter teardown after torch.compile). ``FLAGDIT_RESULTS_STALL=GLOB`` makes
matching tests hang (sleep) instead of running: fault injection for the dry run's simulated kill.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import time
from pathlib import Path

import pytest


def append(path: str | os.PathLike, record: dict) -> None:
    """Appends one record as a single ``write`` on an ``O_APPEND`` descriptor: whole lines even when several
    processes (pytest-xdist workers) share the file, and on disk before the next test starts."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def pytest_addoption(parser):
    group = parser.getgroup("results-log")
    group.addoption("--results-jsonl", default=None, help="append one JSON line per test to this file")
    group.addoption("--results-phase", default="", help="phase name stored in every record")
    group.addoption("--results-inflight", default=None, help="file holding the id of the test in flight")
    group.addoption("--results-fast-exit", action="store_true", help="end the process once pytest is done")


class _Log:
    def __init__(self, config):
        self.path = config.getoption("--results-jsonl")
        self.phase = config.getoption("--results-phase")
        self.inflight = config.getoption("--results-inflight")
        self.controller = not hasattr(config, "workerinput")  # pytest-xdist workers carry workerinput
        self.current: str | None = None
        self.autotune_seen: set[str] = set()
        self.exitstatus = int(pytest.ExitCode.INTERNAL_ERROR)  # until the session finishes

    def write(self, kind: str, **fields) -> None:
        append(self.path, {"kind": kind, "phase": self.phase, "t": round(time.time(), 3), **fields})


_KEY = pytest.StashKey[_Log]()


def pytest_configure(config):
    if config.getoption("--results-jsonl"):
        config.stash[_KEY] = _Log(config)


def _log(config) -> _Log | None:
    return config.stash.get(_KEY, None)


def _versions() -> dict:
    import importlib.metadata

    import torch

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "date": time.strftime("%Y-%m-%d"),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


def pytest_sessionstart(session):
    log = _log(session.config)
    if log is not None and log.controller:
        log.write("session", **_versions())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    log = _log(item.config)
    if log is None:
        return
    log.current = item.nodeid
    log.write("start", test=item.nodeid)
    if log.inflight:
        Path(log.inflight).write_text(item.nodeid)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    stall = os.environ.get("FLAGDIT_RESULTS_STALL")
    if stall and fnmatch.fnmatchcase(item.nodeid, stall):
        time.sleep(3600)  # a hung kernel, as far as the orchestrator can tell


def _message(report) -> str:
    if report.passed:
        return ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])[:300]
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:300] if text.strip() else ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    log = _log(item.config)
    if log is None:
        return
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and not report.passed):
        fields = {"test": item.nodeid, "outcome": report.outcome, "duration_s": round(report.duration, 4)}
        fields["message"] = _message(report)
        bench = item.funcargs.get("benchmark") if hasattr(item, "funcargs") else None
        extra = getattr(bench, "extra_info", None)
        if extra:
            fields["bench"] = dict(extra)
        log.write("result", **fields)
        if extra:
            _write_autotune(log)
    if report.when == "teardown" or (report.when == "setup" and not report.passed):
        log.current = None
        if log.inflight:
            Path(log.inflight).unlink(missing_ok=True)


def _triton_cache_dir() -> Path | None:
    try:
        from triton import knobs

        return Path(knobs.cache.dir)
    except Exception:  # no Triton, or one without knobs (< 3.4): its documented default
        env = os.environ.get("TRITON_CACHE_DIR")
        return Path(env) if env else Path.home() / ".triton" / "cache"


def _write_autotune(log: _Log) -> None:
    """One record per Triton autotune result file not yet written by this run (Triton writes one per tuning
    key with ``cache_results=True``: the median, 20th and 80th percentile ms of every config)."""
    cache = _triton_cache_dir()
    if cache is None or not cache.is_dir():
        return
    for path in sorted(cache.glob("*/*.autotune.json")):
        if str(path) in log.autotune_seen:
            continue
        log.autotune_seen.add(str(path))
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        timings = []
        for config, ms in data.get("configs_timings", []):
            params = dict(config.get("kwargs", {}))
            params.update({k: config[k] for k in ("num_warps", "num_stages") if k in config})
            timings.append({"config": params, "ms": ms})
        log.write("autotune", kernel=path.name.removesuffix(".autotune.json"), key=str(data.get("key")),
                  timings=timings)  # fmt: skip


def pytest_sessionfinish(session, exitstatus):
    log = _log(session.config)
    if log is None:
        return
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        log.write("interrupted", in_flight=log.current)
    if log.inflight:
        Path(log.inflight).unlink(missing_ok=True)
    log.exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # Interpreter teardown after torch.compile and Triton (worker pools, atexit hooks) takes seconds that a
    # short device window cannot spare; everything this run writes is on disk by now.
    log = _log(config)
    if log is not None and config.getoption("--results-fast-exit") and log.controller:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(log.exitstatus)
