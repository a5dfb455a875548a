"""The attention autotune disk cache can never stop a launch: whatever bytes a cache file holds, and whatever the
cache path is (a file, a directory where a file should be, a dangling symlink), a tuned launch runs an offered
tile, warns at most once per file, and leaves a valid entry where the directory is writable.

A stand-in kernel records launches and the timing is stubbed, so this runs on a CPU; the real kernels use the
same ``TunedKernel`` (flagdit_kernels/triton/attention/autotune.py)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.helpers import TRITON_INSTALLED

pytestmark = pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")

REGIME = {"device": "cpu", "dtype": "torch.float16", "head_dim": 64, "gqa": 2, "text": True, "rope": False,
          "seq": 1024}  # fmt: skip
CONSTS = {"HEAD_DIM": 64, "D0": 64, "D1": 0}


class _Recorder:
    """Stands in for a Triton kernel: records the (BLOCK_M, BLOCK_N) of every launch."""

    cache_key = "recorder-source"

    def __init__(self):
        self.runs = []

    def __getitem__(self, grid):
        def run(*args, BLOCK_M, BLOCK_N, **_):
            self.runs.append((BLOCK_M, BLOCK_N))

        return run


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    from flagdit_kernels.triton.attention import autotune as tuning

    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "1")
    monkeypatch.setattr(tuning, "measure", lambda fn: fn() or 1.0)
    return tuning


def _launch(tuning, cache: str) -> tuple[list, list[str], object]:
    """(launches, warnings, kernel) of one tuned launch with the cache at ``cache`` in a fresh 'process'."""
    tuning._warned.clear()
    os.environ["FLAGDIT_KERNELS_AUTOTUNE_CACHE"] = cache
    tiles = [tuning.Tile(64, 64, 4, 2), tuning.Tile(64, 32, 4, 2)]
    recorder = _Recorder()
    kernel = tuning.TunedKernel("robust", recorder, tiles)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel.launch((1,), regime=REGIME, **CONSTS)
    return recorder.runs, [str(w.message) for w in caught], kernel


def _entry_path(tuning, cache: str) -> str:
    _launch(tuning, cache)
    (name,) = os.listdir(cache)
    return os.path.join(cache, name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_bytes_in_a_cache_file_are_survived(tuning, tmp_path_factory, monkeypatch, content):
    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", "")
    cache = str(tmp_path_factory.mktemp("cache"))
    path = _entry_path(tuning, cache)
    good = Path(path).read_bytes()
    Path(path).write_bytes(content)
    runs, caught, kernel = _launch(tuning, cache)
    offered = {(64, 64), (64, 32)}
    assert runs and set(runs) <= offered and len(caught) <= 1
    if content != good:
        assert json.loads(Path(path).read_text(encoding="utf-8"))["key"] == kernel.key(CONSTS, REGIME)


def test_odd_cache_paths_tune_in_memory_with_one_warning(tuning, tmp_path, monkeypatch):
    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", "")
    cache = str(tmp_path / "cache")
    path = _entry_path(tuning, cache)
    os.remove(path)
    os.mkdir(path)  # a directory where the entry should be: unreadable and not replaceable
    runs, caught, _ = _launch(tuning, cache)
    assert runs and len(caught) == 2 and "re-tuning" in caught[0] and "in memory" in caught[1]
    os.rmdir(path)
    os.symlink(str(tmp_path / "nowhere" / "entry.json"), path)  # a dangling symlink: treated as never tuned
    runs, caught, _ = _launch(tuning, cache)
    assert runs and len(caught) <= 1
    (tmp_path / "plain").write_text("not a directory")
    runs, caught, _ = _launch(tuning, str(tmp_path / "plain"))  # the cache "directory" is a file
    assert runs and len(caught) == 1 and "in memory" in caught[0]
