"""How the attention kernels pick their tiles (FLAGDIT_KERNELS_AUTOTUNE) and the cache-warming driver."""

import pytest
import triton

from flagdit_kernels import _dispatch

pytestmark = pytest.mark.skipif(not _dispatch.triton_installed(), reason="needs triton")


class _Recorder:
    """Stands in for an autotuned kernel: records the configs each launch ran with."""

    def __init__(self, configs, fail_on=()):
        self.configs, self.fail_on, self.runs, self.tuned = configs, fail_on, [], 0
        recorder = self

        class _Jit:
            def __getitem__(self, grid):
                def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **consts):
                    if (BLOCK_M, BLOCK_N) in recorder.fail_on:
                        from triton.runtime.errors import OutOfResources

                        raise OutOfResources(300000, 232448, "shared memory")
                    recorder.runs.append((BLOCK_M, BLOCK_N, num_warps, num_stages))

                return run

        self.fn = _Jit()

    def __getitem__(self, grid):
        def tuned(*args, **consts):
            self.tuned += 1

        return tuned


def _configs():
    cfg = lambda bm, bn: triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=2)
    return [cfg(128, 64), cfg(64, 64), cfg(64, 32)]


@pytest.mark.parametrize(
    ("mode", "head_dim", "expected_runs", "tuned"),
    [
        ("0", 64, [(128, 64, 4, 2)], 0),  # untuned: the first config that fits
        ("0", 256, [(64, 64, 4, 2)], 0),  # 128-row tiles do not fit a 256 head dim
        ("compile", 64, [(128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2)], 0),  # every config, once
        ("1", 64, [], 1),  # the autotuner
    ],
)
def test_launch_modes(monkeypatch, mode, head_dim, expected_runs, tuned):
    from flagdit_kernels.triton import attention_autotune as tuning
    from flagdit_kernels.triton import varlen_attention as va

    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", mode)
    kernel = _Recorder(_configs())
    tuning.launch(kernel, (1,), HEAD_DIM=head_dim, **va._chunks(head_dim))
    assert kernel.runs == expected_runs
    assert kernel.tuned == tuned


def test_configs_the_card_cannot_hold_are_skipped(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from flagdit_kernels.triton import attention_autotune as tuning
    from flagdit_kernels.triton import varlen_attention as va

    kernel = _Recorder(_configs(), fail_on={(128, 64)})
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "compile")
    tuning.launch(kernel, (1,), HEAD_DIM=64, **va._chunks(64))
    assert kernel.runs == [(64, 64, 4, 2), (64, 32, 4, 2)]
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "0")  # untuned: the first config the card holds
    kernel.runs.clear()
    tuning.launch(kernel, (1,), HEAD_DIM=64, **va._chunks(64))
    assert kernel.runs == [(64, 64, 4, 2)]
    kernel = _Recorder(_configs(), fail_on={(128, 64), (64, 64), (64, 32)})  # none fits: the error surfaces
    with pytest.raises(OutOfResources):
        tuning.launch(kernel, (1,), HEAD_DIM=64, **va._chunks(64))


def test_warm_runs_every_implementation_once(capsys):
    from flagdit_kernels.bench.warm import _run_shard

    assert _run_shard(0, 1, ("packing",), quick=True) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[warm 0/1]")]
    assert lines and all(line.split(": ", 1)[1].startswith("ok") for line in lines)
    assert any("python loop" in line for line in lines)
