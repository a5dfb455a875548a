"""Kernels offered beside the tuned Triton forward (the Gluon forward) are trusted only after they matched it on
the GPU (flagdit_kernels/triton/attention/candidates.py). Gluon cannot run here, so stand-in candidates whose
outputs the test controls go through the same selection: one agrees, one disagrees, one writes NaN, one fails
to launch; timing is stubbed. Also: the hook is only consulted where it may apply (tuned mode, sm_90, opt-in),
and the Gluon glue reads the Triton forward's arguments by the kernel's own parameter names.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from support.helpers import TRITON_INSTALLED

pytestmark = pytest.mark.skipif(not TRITON_INSTALLED, reason="needs triton")

SM90 = {"device": "NVIDIA H200", "capability": [9, 0], "dtype": "torch.bfloat16", "head_dim": 128}


@pytest.fixture
def cand(monkeypatch, tmp_path):
    from flagdit_kernels.triton.attention import autotune as tuning
    from flagdit_kernels.triton.attention import candidates as cand

    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(cand, "_chosen", {})
    tuning._warned.clear()
    return cand


class _Kernels:
    """A reference and candidates writing into shared outputs; ``speed`` sets each one's stubbed time."""

    def __init__(self, speed: dict[str, float]):
        self.out = torch.empty(64, 8)
        self.lse = torch.empty(8, 64)
        self.truth = (torch.randn(64, 8), torch.randn(8, 64))
        self.speed, self.runs, self.current = speed, [], None

    def writer(self, name, out_fn, lse_fn=lambda x: x):
        def run():
            self.runs.append(name)
            self.current = name
            self.out.copy_(out_fn(self.truth[0]))
            self.lse.copy_(lse_fn(self.truth[1]))

        return run

    def failing(self, name):
        def run():
            self.runs.append(name)
            raise RuntimeError("no kernel image for this device")

        return run


def _choose(cand, monkeypatch, kernels: _Kernels, key="regime-A"):
    monkeypatch.setattr(cand.tuning, "measure", lambda fn: (fn(), kernels.speed[kernels.current])[1])
    candidates = {
        "agrees": kernels.writer("agrees", lambda x: x * (1 + 1e-4)),
        "disagrees": kernels.writer("disagrees", lambda x: x, lambda x: x + 0.5),  # lse off by 0.5
        "nan": kernels.writer("nan", lambda x: torch.where(x > 1, float("nan"), x)),
        "fails": kernels.failing("fails"),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        choice = cand.choose(key, kernels.writer("triton", lambda x: x), candidates, [kernels.out, kernels.lse], 1e-2)
    return choice, [str(w.message) for w in caught]


def test_disagreeing_candidates_are_dropped_with_one_warning_each_and_recorded(cand, monkeypatch, tmp_path):
    kernels = _Kernels({"triton": 2.0, "agrees": 1.0, "disagrees": 0.1, "nan": 0.1, "fails": 0.1})
    choice, messages = _choose(cand, monkeypatch, kernels)
    assert choice == "agrees"  # the fastest one that matched; the faster wrong ones never compete
    for name in ("disagrees", "nan", "fails"):
        assert sum(f"kernel {name} " in m for m in messages) == 1, messages
    assert not any("kernel agrees " in m for m in messages)
    (path,) = tmp_path.glob("candidates-*.json")
    data = json.loads(path.read_text())
    assert data["choice"] == "agrees" and set(data["rejected"]) == {"disagrees", "nan", "fails"}
    assert "rel-L2" in data["rejected"]["disagrees"] and "non-finite" in data["rejected"]["nan"]
    assert set(data["timings_ms"]) == {"triton", "agrees"}


def test_triton_stays_when_it_is_fastest(cand, monkeypatch):
    kernels = _Kernels({"triton": 0.5, "agrees": 1.0, "disagrees": 0.1, "nan": 0.1, "fails": 0.1})
    assert _choose(cand, monkeypatch, kernels)[0] == cand.TRITON


def test_a_cached_choice_is_reused_without_running_candidates(cand, monkeypatch):
    kernels = _Kernels({"triton": 2.0, "agrees": 1.0, "disagrees": 0.1, "nan": 0.1, "fails": 0.1})
    _choose(cand, monkeypatch, kernels)
    monkeypatch.setattr(cand, "_chosen", {})  # a new process: only the file remains
    kernels.runs.clear()
    choice, messages = _choose(cand, monkeypatch, kernels)
    assert choice == "agrees" and kernels.runs == [] and messages == []


def test_a_cache_file_naming_a_kernel_not_offered_is_retuned(cand, monkeypatch, tmp_path):
    kernels = _Kernels({"triton": 2.0, "agrees": 1.0, "disagrees": 0.1, "nan": 0.1, "fails": 0.1})
    _choose(cand, monkeypatch, kernels)
    (path,) = tmp_path.glob("candidates-*.json")
    data = json.loads(path.read_text())
    data["choice"] = "disagrees-but-edited-in"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(cand, "_chosen", {})
    cand.tuning._warned.clear()
    choice, messages = _choose(cand, monkeypatch, kernels)
    assert choice == "agrees" and any("ignoring the candidate cache file" in m for m in messages)
    assert json.loads(path.read_text())["choice"] == "agrees"


def test_disagreement_measure():
    from flagdit_kernels.triton.attention.candidates import disagreement

    x = torch.randn(100)
    assert disagreement([x * (1 + 1e-3)], [x], 1e-2) is None
    assert "rel-L2" in disagreement([x + 1], [x], 1e-2)
    assert "non-finite" in disagreement([torch.full_like(x, float("inf"))], [x], 1e-2)
    # Where the reference itself is not finite (it never is for a correct launch), nothing is compared.
    assert disagreement([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, float("nan")])], 1e-2) is None


def test_the_hook_applies_only_tuned_on_sm90_with_opt_in(monkeypatch):
    from flagdit_kernels.triton.attention import autotune as tuning
    from flagdit_kernels.triton.attention import candidates as cand

    monkeypatch.delenv("FLAGDIT_KERNELS_GLUON", raising=False)
    assert not cand.gluon_forward(None, None, (), {}, SM90, [], None)  # not opted in: nothing is looked at
    monkeypatch.setenv("FLAGDIT_KERNELS_GLUON", "1")
    assert not cand.gluon_forward(None, None, (), {}, {**SM90, "capability": [10, 0]}, [], None)
    assert not cand.gluon_forward(None, None, (), {}, {"device": "cpu"}, [], None)

    calls = []
    kernel = tuning.TunedKernel("hooked", None, [tuning.Tile(64, 64, 4, 2)])
    monkeypatch.setattr(kernel, "_run", lambda tile, grid, args, consts: calls.append("triton"))
    monkeypatch.setattr(tuning, "measure", lambda fn: 1.0)
    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", os.devnull + "/none")  # unwritable: memory only
    kernel.alternatives = lambda *a: calls.append("alternative") or True
    with tuning.autotune_mode("1"):
        kernel.launch((1,), regime=SM90)
    assert calls == ["alternative"]
    calls.clear()
    with tuning.autotune_mode("0"):  # untuned launches never consult candidates
        kernel.launch((1,), regime=SM90)
    assert calls == ["triton"]


def test_gluon_glue_reads_the_triton_forward_arguments_by_name(cand, monkeypatch):
    """offer() maps a launch of the real _fwd_kernel onto the Gluon launch by parameter names: the tensors it
    hands the Gluon kernel are the ones the Triton launcher passed, and its outputs are compared."""
    from flagdit_kernels.triton import _helpers
    from flagdit_kernels.triton.attention import gluon_fwd as gluon_fwd
    from flagdit_kernels.triton.attention.launch import FORWARD

    T, H, D = 256, 4, 128
    q, k, v = (torch.randn(T, H, D).to(torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(H, T)
    cu = torch.tensor([0, 100, 256], dtype=torch.int32)
    view = lambda t: (t, 0, 0)  # the kernel's (tensor, token stride, head stride); strides unread
    values = {"q": view(q), "k": view(k), "v": view(v), "text_k": view(k), "text_v": view(v), "out": view(out),
              "o_text": out, "tanh_gate": lse, "lse": lse, "lse_text": lse, "offsets": (cu, cu, cu),
              "qk_scale": 0.1, "text_qk_scale": 0.1, "T": T, "GROUP": 1, "n_seqs": 2}  # fmt: skip
    names = FORWARD.fn.arg_names
    args = tuple(values.get(n, 0) for n in names[: names.index("HEAD_DIM")])  # the runtime ones
    seen = {}

    def fake_launch(config, q_, k_, v_, tk, tv, tg, out_, ot, lse_, lt, cu_, tcu, s, ts, T_, group, batch, text, n):
        seen.update(q=q_, k=k_, v=v_, out=out_, cu=cu_, T=T_, batch=batch, text=text, programs=n)
        out_.copy_(expected_out)
        lse_.copy_(expected_lse)

    expected_out, expected_lse = torch.randn_like(q), torch.randn(H, T)

    def fake_run(tile, grid, args_, consts):
        out.copy_(expected_out)
        lse.copy_(expected_lse)

    monkeypatch.setattr(gluon_fwd, "launch", fake_launch)
    monkeypatch.setattr(_helpers, "device_limits", lambda device: (132, 65536, 2048, 233472))
    monkeypatch.setattr(FORWARD, "_tuned", lambda *a: FORWARD.tiles[0])
    monkeypatch.setattr(FORWARD, "_run", fake_run)
    monkeypatch.setattr(cand.tuning, "measure", lambda fn: (fn(), 0.5 if seen else 1.0)[1])
    monkeypatch.setenv("FLAGDIT_KERNELS_GLUON", "1")
    ran = cand.gluon_forward(FORWARD, (1,), args, {"HAS_TEXT": False, "HEAD_DIM": D}, SM90, [], lambda: None)
    assert ran
    assert seen["q"] is q and seen["k"] is k and seen["v"] is v and seen["out"] is out and seen["cu"] is cu
    assert (seen["T"], seen["batch"], seen["text"], seen["programs"]) == (T, 2, False, 132)


def test_gluon_schedule_is_real_tiles_longest_first():
    """The Gluon forward's work list: the sequences longest first (ties in batch order), the prefix sums of their
    128-query tiles (an empty sequence has none), and the launch's item bound covers every real item."""
    from flagdit_kernels.triton.attention import gluon_fwd as gluon_fwd

    lens = [5, 0, 300, 128, 129, 300, 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    order, tile_cum = gluon_fwd.schedule(cu)
    assert order.tolist() == [2, 5, 4, 3, 0, 6, 1]
    tiles = [-(-lens[b] // gluon_fwd.BLOCK_M) for b in order.tolist()]
    assert tiles == [3, 3, 2, 1, 1, 1, 0]
    assert tile_cum.tolist() == [0, 3, 6, 8, 9, 10, 11, 11]
    assert order.dtype == tile_cum.dtype == torch.int32
    heads = 3
    assert gluon_fwd.item_bound(sum(lens), len(lens), heads) >= tile_cum[-1].item() * heads


@pytest.mark.parametrize("head_dim", [72, 96, 80, 256])
def test_gluon_forward_not_offered_where_it_cannot_run(head_dim):
    """Head dims without a Gluon config (Gluon register tensors are powers of two: no 80- or 96-wide product) and
    layouts TMA cannot read (token stride not a multiple of 16 bytes, heads not adjacent) keep the Triton kernel."""
    from flagdit_kernels.triton.attention import gluon_fwd as gluon_fwd

    q = torch.randn(8, 2, head_dim).to(torch.bfloat16)
    assert not gluon_fwd.supported(q, q, q)
    q = torch.randn(8, 2, 64).to(torch.bfloat16)
    assert gluon_fwd.supported(q, q, q)
    padded = torch.randn(8, 2 * 64 + 4).to(torch.bfloat16)[:, : 2 * 64].view(8, 2, 64)  # 264-byte token stride
    assert not gluon_fwd.supported(q, padded, q)
    strided_heads = torch.randn(8, 2, 72).to(torch.bfloat16)[:, :, :64]
    assert not gluon_fwd.supported(strided_heads, q, q)
    assert not gluon_fwd.supported(q.float(), q, q)
