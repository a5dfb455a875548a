"""How the attention kernels pick their tiles (FLAGDIT_KERNELS_AUTOTUNE), the tuning key, the on-disk cache that
must never mislead (corrupt, foreign or tampered entries are re-tuned; an unwritable directory tunes in memory),
and the cache-warming driver. A stand-in kernel records launches; timing is stubbed."""

import json
import os
import warnings

import pytest
import torch
from support.helpers import TRITON_INSTALLED

pytestmark = pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")


class _FakeKernel:
    """Stands in for a Triton kernel: records the tile of each launch (in ``runs``, and in ``events`` if given);
    tiles in ``fail_on`` raise OutOfResources the way a tile the card cannot hold does."""

    cache_key = "fake-kernel-source"
    last = None  # the tile of the latest run of any instance, for the timing stub

    def __init__(self, fail_on=(), events=None):
        self.runs, self.fail_on, self.events = [], set(fail_on), events

    def __getitem__(self, grid):
        def run(*args, BLOCK_M, BLOCK_N, TMA, num_warps, num_stages, **consts):
            if (BLOCK_M, BLOCK_N) in self.fail_on:
                from triton.runtime.errors import OutOfResources

                raise OutOfResources(300000, 232448, "shared memory")
            self.runs.append((BLOCK_M, BLOCK_N))
            _FakeKernel.last = (BLOCK_M, BLOCK_N)
            if self.events is not None:
                self.events.append("run")

        return run


@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """The autotune module with the cache under tmp_path, warnings reset, timing stubbed: a 64x64 tile is the
    fastest, 128x64 the slowest; ``tuning.timed`` lists the tiles measured."""
    from flagdit_kernels.triton.attention import autotune as tuning

    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "_warned", set())
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "1")
    times = {(128, 64): 3.0, (64, 64): 1.0, (64, 32): 2.0}
    timed = []

    def measure(fn):
        fn()
        timed.append(_FakeKernel.last)
        return times[timed[-1]]

    monkeypatch.setattr(tuning, "measure", measure)
    tuning.timed = timed
    return tuning


def _kernel(tuning, fake=None):
    tiles = [tuning.Tile(128, 64, 4, 2), tuning.Tile(64, 64, 4, 2), tuning.Tile(64, 32, 4, 2)]
    return tuning.TunedKernel("fake", fake or _FakeKernel(), tiles)


REGIME = {"device": "cpu", "dtype": "torch.bfloat16", "head_dim": 64, "gqa": 1, "text": False, "rope": False,
          "seq": 4096}  # fmt: skip
CONSTS = {"HEAD_DIM": 64, "D0": 64, "D1": 0}


@pytest.mark.parametrize(
    ("mode", "head_dim", "expected_runs"),
    [
        ("0", 64, [(128, 64)]),  # untuned: the first tile that fits
        ("0", 256, [(64, 64)]),  # 128-row tiles do not fit a 256 head dim
        ("compile", 64, [(128, 64), (64, 64), (64, 32)]),  # every tile, once
        ("1", 64, [(128, 64), (128, 64), (64, 64), (64, 64), (64, 32), (64, 32), (64, 64)]),  # compile + time, run
    ],
)
def test_launch_modes(tuning, monkeypatch, mode, head_dim, expected_runs):
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", mode)
    fake = _FakeKernel()
    _kernel(tuning, fake).launch((1,), regime=REGIME, HEAD_DIM=head_dim, D0=head_dim, D1=0)
    assert fake.runs == expected_runs


def test_tiles_the_card_cannot_hold_are_skipped(tuning, monkeypatch):
    from triton.runtime.errors import OutOfResources

    for mode, expected in (
        ("compile", [(64, 64), (64, 32)]),
        ("0", [(64, 64)]),
        ("1", [(64, 64), (64, 64), (64, 32), (64, 32), (64, 64)]),
    ):
        monkeypatch.setattr(tuning, "AUTOTUNE_MODE", mode)
        fake = _FakeKernel(fail_on={(128, 64)})
        _kernel(tuning, fake).launch((1,), regime=REGIME, **CONSTS)
        assert fake.runs[: len(expected)] == expected
    fake = _FakeKernel(fail_on={(128, 64), (64, 64), (64, 32)})  # none fits: the error surfaces
    with pytest.raises(OutOfResources):
        _kernel(tuning, fake).launch((1,), regime=REGIME, **CONSTS)


def test_tuned_once_per_regime_and_remembered_across_processes(tuning):
    kernel = _kernel(tuning)
    kernel.launch((1,), regime=REGIME, **CONSTS)
    assert len(tuning.timed) == 3 and list(kernel.chosen.values()) == [tuning.Tile(64, 64, 4, 2)]
    kernel.launch((1,), regime=REGIME, **CONSTS)
    assert len(tuning.timed) == 3  # same regime: remembered
    assert kernel.tuned() == {"cpu torch.bfloat16 64 1 False False 4096": "64x64/w4/s2"}
    for change in ({"gqa": 4}, {"seq": 8192}, {"device": "NVIDIA H200"}, {"rope": True}, {"dtype": "torch.float16"}):
        kernel.launch((1,), regime={**REGIME, **change}, **CONSTS)
    assert len(tuning.timed) == 3 * 6  # every regime tuned on its own
    kernel.launch((1,), regime=REGIME, **CONSTS, TMA_OK=False)  # another compile-time flag: another key
    assert len(tuning.timed) == 3 * 7
    fresh = _kernel(tuning)  # a new process: the disk cache, no timing
    fresh.launch((1,), regime=REGIME, **CONSTS)
    assert len(tuning.timed) == 3 * 7 and list(fresh.chosen.values()) == [tuning.Tile(64, 64, 4, 2)]
    (path,) = [p for p in _cache_files(tuning) if _load(p)["key"] == kernel.key(CONSTS, REGIME)]
    assert _load(path)["tile"] == {"block_m": 64, "block_n": 64, "warps": 4, "stages": 2, "tma": False}


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _cache_files(tuning):
    root = tuning.cache_dir()
    return [os.path.join(root, name) for name in sorted(os.listdir(root))]


def _tampered(text, data):
    data["tile"] = {"block_m": 256, "block_n": 256, "warps": 8, "stages": 1, "tma": False}  # not offered
    return json.dumps(data)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda text, data: "",  # empty
        lambda text, data: text[: len(text) // 2],  # truncated
        lambda text, data: b"\x89PNG\r\n\x1a\n\x00\xff\xfe",  # foreign binary, not UTF-8
        lambda text, data: json.dumps([1, 2, 3]),  # JSON, not an entry
        lambda text, data: json.dumps({**data, "key": data["key"].replace("fake", "other")}),  # another key's
        lambda text, data: json.dumps({**data, "version": 0}),  # an older format
        _tampered,
        lambda text, data: json.dumps({**data, "tile": {"block_m": "64"}}),  # malformed tile
    ],
)
def test_bad_cache_entries_are_retuned_with_one_warning(tuning, corrupt):
    _kernel(tuning).launch((1,), regime=REGIME, **CONSTS)
    (path,) = _cache_files(tuning)
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def spoil():
        bad = corrupt(text, json.loads(text))
        with open(path, "wb") as f:
            f.write(bad if isinstance(bad, bytes) else bad.encode())

    spoil()
    for attempt in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _kernel(tuning).launch((1,), regime=REGIME, **CONSTS)
        assert len(tuning.timed) == 3 * (2 + attempt), "a bad entry must be re-tuned, never trusted"
        if attempt == 0:
            assert len(caught) == 1 and "re-tuning" in str(caught[0].message)
            spoil()  # and again, after the re-tune rewrote it
        else:
            assert not caught  # one warning per file and process
    assert _load(path)["key"] == json.loads(text)["key"]  # rewritten whole


def test_unwritable_cache_directory_tunes_in_memory_with_one_warning(tuning, monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", str(blocker / "cache"))  # a directory under a file
    kernel = _kernel(tuning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel.launch((1,), regime=REGIME, **CONSTS)
        kernel.launch((1,), regime={**REGIME, "seq": 256}, **CONSTS)
        kernel.launch((1,), regime=REGIME, **CONSTS)
    assert len(caught) == 1 and "in memory" in str(caught[0].message)
    assert len(tuning.timed) == 6 and len(kernel.chosen) == 2


def test_accumulating_kernels_are_reset_before_every_run(tuning):
    # The dk/dv kernel adds into the dq buffer: every compile, timing and final run starts from a reset buffer.
    events = []
    tiles = [tuning.Tile(128, 64, 4, 2), tuning.Tile(64, 64, 4, 2)]
    kernel = tuning.TunedKernel("fake", _FakeKernel(events=events), tiles)
    kernel.launch((1,), regime=REGIME, reset=lambda: events.append("reset"), **CONSTS)
    assert events == ["reset", "run"] * 5  # compile + time each tile, then the chosen one


def test_seq_bucket_and_device_fields(tuning):
    assert [tuning.seq_bucket(n) for n in (0, 1, 300, 4096, 4097, 10**7)] == [256, 256, 512, 4096, 8192, 1 << 17]
    assert tuning.device_fields(torch.device("cpu")) == {"device": "cpu"}


def test_warm_runs_every_implementation_once(capsys):
    from flagdit_kernels.bench.warm import _run_shard

    assert _run_shard(0, 1, ("packing",), quick=True) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[warm 0/1]")]
    assert lines and all(line.split(": ", 1)[1].startswith("ok") for line in lines)
    assert any("python loop" in line for line in lines)
