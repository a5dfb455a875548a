"""The backward's choice on sm_90 between the warp-specialized pair (dk/dv kernel + dq kernel) and the
five-matmul kernel with dq by atomics (launch.backward), with timings the test controls: the faster kept, in the
tuning cache under its safety rules, read back without timing; deterministic calls never take the atomics.
On the CPU the warp-specialized tiles are declared ready (force_warp_specialized) and tuning is switched on."""

from __future__ import annotations

import json

import pytest
import torch
from support.helpers import DEVICE, ON_GPU, compare_with_reference, force_warp_specialized, offsets_of

import flagdit_kernels as fk
from flagdit_kernels import reference as ref
from flagdit_kernels.triton.attention import autotune as tuning
from flagdit_kernels.triton.attention import launch as va

pytestmark = pytest.mark.skipif(ON_GPU, reason="controlled timings of the launcher; the GPU times the real thing")

PAIR, ATOMICS = va.BWD_PAIR, va.BWD_ATOMIC_DQ


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """(timings, ran, measured): the time each way takes (set by the test), the way of every dk/dv launch, and
    the number of timings taken; tuning on, an empty cache in tmp_path, nothing chosen in this process yet."""
    force_warp_specialized(monkeypatch)
    ws, plain = va.DKDV.tiles[0], tuning.Tile(32, 32, 4, 2)
    monkeypatch.setattr(va.DKDV, "tiles", [ws, plain])
    monkeypatch.setattr(va.DQ, "tiles", [va.DQ.tiles[0], plain])
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "1")
    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_variants", {})
    monkeypatch.setattr(tuning, "_warned", set())
    for kernel in (va.FORWARD, va.DKDV, va.DQ):
        monkeypatch.setattr(kernel, "chosen", {})
    timings: dict[str, float] = {}
    ran: list[str] = []
    measured: list[str] = []
    launch = va.DKDV.launch

    def recording_launch(*args, **consts):
        ran.append(PAIR if consts["WS_OK"] else ATOMICS)
        assert consts["WS_OK"] != consts["ATOMIC_DQ"]
        return launch(*args, **consts)

    def measure(run):
        run()
        measured.append(ran[-1] if ran else "forward")
        return timings.get(ran[-1], 1.0) if ran else 1.0

    monkeypatch.setattr(va.DKDV, "launch", recording_launch)
    monkeypatch.setattr(tuning, "measure", measure)
    return timings, ran, measured


def _case(deterministic: bool = False):
    gen = torch.Generator().manual_seed(0)
    lens, text_lens, dtype = [7, 12], [3, 0], torch.float16

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * s).to(dtype).to(DEVICE)

    inputs = {"q": rnd(19, 2, 32), "k": rnd(19, 1, 32), "v": rnd(19, 1, 32), "text_k": rnd(3, 1, 32),
              "text_v": rnd(3, 1, 32), "gate": rnd(2, s=0.8)}  # fmt: skip
    fixed = {"cu_seqlens": offsets_of(lens), "max_seqlen": 12, "text_cu_seqlens": offsets_of(text_lens),
             "text_max_seqlen": 3}  # fmt: skip

    def mine(**t):
        return fk.varlen_attention(**t, **fixed, backend="triton", deterministic=deterministic)

    def reference(**t):
        return ref.varlen_attention(**t, **fixed)

    return inputs, mine, reference, dtype


def _choice_files(tmp_path):
    return sorted(tmp_path.glob("backward-*.json"))


def _new_process():
    tuning._variants.clear()
    for kernel in (va.FORWARD, va.DKDV, va.DQ):
        kernel.chosen.clear()


@pytest.mark.parametrize("winner", [PAIR, ATOMICS])
def test_the_faster_way_is_kept_and_read_back_without_timing(timed, tmp_path, winner):
    timings, ran, measured = timed
    timings.update({PAIR: 2.0, ATOMICS: 1.0} if winner == ATOMICS else {PAIR: 1.0, ATOMICS: 2.0})
    inputs, mine, reference, dtype = _case()
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    assert {PAIR, ATOMICS} <= set(measured), "both ways were timed"
    assert ran[-1] == winner, "the gradients are the winner's (it runs last)"
    (path,) = _choice_files(tmp_path)
    data = json.loads(path.read_text())
    assert data["variant"] == winner and data["timings_ms"] == {PAIR: timings[PAIR], ATOMICS: timings[ATOMICS]}
    assert list(va.tuned_tiles()["backward"].values()) == [winner]
    # A new process: the cache files decide (the way and each kernel's tiles), nothing is timed.
    _new_process()
    del ran[:], measured[:]
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    assert ran == [winner] and measured == []


def test_deterministic_never_takes_the_atomics(timed, tmp_path):
    timings, ran, measured = timed
    timings.update({PAIR: 2.0, ATOMICS: 1.0})
    inputs, mine, reference, dtype = _case(deterministic=True)
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    assert ran and set(ran) == {PAIR} and ATOMICS not in measured
    assert not _choice_files(tmp_path)
    # Not even where the same regime's non-deterministic calls chose the atomics.
    inputs, mine, reference, dtype = _case()
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    assert ran[-1] == ATOMICS and len(_choice_files(tmp_path)) == 1
    del ran[:]
    inputs, mine, reference, dtype = _case(deterministic=True)
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    assert ran == [PAIR]


def test_an_untrusted_choice_file_is_retimed_with_one_warning(timed, tmp_path):
    timings, ran, measured = timed
    timings.update({PAIR: 2.0, ATOMICS: 1.0})
    inputs, mine, reference, dtype = _case()
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    (path,) = _choice_files(tmp_path)
    key = json.loads(path.read_text())["key"]
    for content in ("", json.dumps({"version": 1, "key": "another regime", "variant": PAIR}),
                    json.dumps({"version": 1, "key": key, "variant": "a way not offered"})):  # fmt: skip
        path.write_text(content)
        _new_process()
        tuning._warned.clear()
        del ran[:], measured[:]
        with pytest.warns(RuntimeWarning, match="backward variant cache file"):
            compare_with_reference(mine, reference, inputs, dtype, family="attention")
        assert {PAIR, ATOMICS} <= set(measured) and ran[-1] == ATOMICS
        assert json.loads(path.read_text())["variant"] == ATOMICS


@pytest.mark.parametrize("mode", ["0", "compile"])
def test_untuned_modes_keep_the_pair_by_default(timed, monkeypatch, tmp_path, mode):
    # Compile-only mode also compiles the atomics' tiles (for the tuned runs to come); the pair runs last.
    timings, ran, measured = timed
    timings.update({PAIR: 2.0, ATOMICS: 1.0})
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", mode)
    inputs, mine, reference, dtype = _case()
    compare_with_reference(mine, reference, inputs, dtype, family="attention")
    assert ran == ([PAIR] if mode == "0" else [ATOMICS, PAIR]) and measured == [] and not _choice_files(tmp_path)
