"""The engine choice of ``fk.varlen_attention`` (ops/attention_engines.py) with engines whose timings the test
controls: the fastest kept, cached in memory and on disk with the tile cache's safety rules, deterministic calls
limited to deterministic engines, ``backend=`` still forcing one; and the ``torch_varlen`` engine's composition
(text branch, gate, LSE, 0 keys) around torch's ``varlen_attn``, run on the CPU through a CPU registration of
our torch flash-attention implementation."""

from __future__ import annotations

import json

import pytest
import torch
from support.helpers import compare_with_reference

import flagdit_kernels as fk
from flagdit_kernels import _dispatch
from flagdit_kernels import reference as ref
from flagdit_kernels.ops import attention_engines as engines


@pytest.fixture(autouse=True)
def _fresh_choices():
    engines._chosen.clear()
    engines._fast.clear()
    yield
    engines._chosen.clear()
    engines._fast.clear()


def _recorder(timings: dict[str, float]):
    """(candidates, measure, calls): closures that record their engine; measure returns the engine's time."""
    calls: list[str] = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in timings}

    def measure(run):
        run()
        return timings[calls[-1]]

    return candidates, measure, calls


def _warnings():
    seen: list[str] = []
    return seen, lambda topic, message: seen.append(message)


FIELDS = {"device": "H100", "dtype": "bfloat16", "head_dim": 128, "seq": 4096}


def test_the_fastest_is_kept_in_memory_and_on_disk(tmp_path):
    candidates, measure, calls = _recorder({"triton": 1.3, "torch_varlen": 0.9, "flash_attn": 1.1})
    seen, warn = _warnings()
    assert engines.choose(FIELDS, candidates, measure=measure, directory=str(tmp_path), warn=warn) == "torch_varlen"
    assert sorted(calls) == ["flash_attn", "torch_varlen", "triton"]
    assert engines.chosen() and list(engines.chosen().values()) == ["torch_varlen"]
    assert engines.choose(FIELDS, candidates, measure=measure, directory=str(tmp_path), warn=warn) == "torch_varlen"
    assert len(calls) == 3, "a regime seen in this process is not timed again"
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    assert data["engine"] == "torch_varlen" and data["timings_ms"] == {"triton": 1.3, "torch_varlen": 0.9,
                                                                       "flash_attn": 1.1}  # fmt: skip
    engines._chosen.clear()  # a new process: the file decides, nothing is timed
    assert engines.choose(FIELDS, candidates, measure=measure, directory=str(tmp_path), warn=warn) == "torch_varlen"
    assert len(calls) == 3 and not seen
    # Another regime, or another set of engines offered, is another key.
    del candidates["torch_varlen"]
    assert engines.choose(FIELDS, candidates, measure=measure, directory=str(tmp_path), warn=warn) == "flash_attn"
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize(
    "content",
    [
        "",
        '{"version": 1, "key": "',
        json.dumps({"version": 1, "key": "another regime", "engine": "flash_attn"}),
        None,  # the right key naming an engine not offered (edited)
    ],
    ids=["empty", "truncated", "foreign", "not-offered"],
)
def test_untrusted_cache_files_are_retimed_with_one_warning(tmp_path, content):
    candidates, measure, calls = _recorder({"triton": 0.5, "torch_varlen": 0.9})
    seen, warn = _warnings()
    engines.choose(FIELDS, candidates, measure=measure, directory=str(tmp_path), warn=warn)
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    data["engine"] = "cudnn"
    path.write_text(json.dumps(data) if content is None else content)
    engines._chosen.clear()
    assert engines.choose(FIELDS, candidates, measure=measure, directory=str(tmp_path), warn=warn) == "triton"
    assert len(calls) == 4 and len(seen) == 1 and "re-timing" in seen[0]
    assert json.loads(path.read_text())["engine"] == "triton", "rewritten"


def test_unwritable_directory_keeps_choices_in_memory_and_failing_engines_are_left_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    candidates, measure, _ = _recorder({"triton": 2.0, "torch_varlen": 1.0})

    def fails():
        raise RuntimeError("CUDA out of memory")

    candidates["flash_attn"] = fails
    seen, warn = _warnings()
    assert engines.choose(FIELDS, candidates, measure=measure, directory=str(blocker), warn=warn) == "torch_varlen"
    assert len(seen) == 1 and "keeping them in memory" in seen[0]
    with pytest.raises(RuntimeError, match="no attention engine ran this call"):
        engines.choose({"other": 1}, {"flash_attn": fails}, measure=measure, directory=str(tmp_path), warn=warn)


@pytest.fixture
def fake_engines(monkeypatch, tmp_path):
    """Every engine available, each a function recording its name; timings set by the test."""
    from flagdit_kernels.triton.attention import autotune as tuning

    ran: list[str] = []
    timings: dict[str, float] = {}

    def resolve(op, like, backend=None, prefer=None):
        def fn(*args, **kwargs):
            ran.append(backend)
            out = args[0] * 1.0
            return (out, out.sum()) if kwargs.get("return_lse") else out

        return _dispatch.Impl(op, backend, fn, ("cuda",))

    monkeypatch.setattr(engines._dispatch, "resolve", resolve)
    monkeypatch.setattr(tuning, "AUTOTUNE_MODE", "1")
    monkeypatch.setattr(tuning, "measure", lambda run: (run(), timings[ran[-1]])[1])
    monkeypatch.setenv("FLAGDIT_KERNELS_AUTOTUNE_CACHE", str(tmp_path))
    return ran, timings


def _call_args(requires_grad=False):
    q = torch.randn(10, 2, 16, requires_grad=requires_grad)
    k = torch.randn(10, 1, 16)
    return (q, k, k.clone(), torch.tensor([0, 10], dtype=torch.int32), 10, 0.25), {"return_lse": False}


def test_engine_for_times_the_engines_once_and_respects_determinism(fake_engines):
    ran, timings = fake_engines
    timings.update(triton=1.0, torch_varlen=0.4, flash_attn=0.7)
    default = _dispatch.Impl("varlen_attention", "triton", lambda *a, **k: None, ("cuda",))
    args, kwargs = _call_args()
    fn = engines.engine_for(default, args, kwargs, deterministic=False)
    assert sorted(ran) == ["flash_attn", "torch_varlen", "triton"]
    ran.clear()
    fn(*args, **kwargs)
    assert ran == ["torch_varlen"]
    # deterministic=True: torch's varlen_attn (nondeterministic backward) is not a candidate.
    fn = engines.engine_for(default, args, kwargs, deterministic=True)
    ran.clear()
    fn(*args, **kwargs)
    assert ran == ["flash_attn"]
    # A call that needs a backward is another regime, timed with its backward.
    args, kwargs = _call_args(requires_grad=True)
    ran.clear()
    engines.engine_for(default, args, kwargs, deterministic=False)
    assert sorted(ran) == ["flash_attn", "torch_varlen", "triton"]
    assert {"backward=True", "backward=False"} <= {w for r in engines.chosen() for w in r.split()}


def test_untimed_regimes_take_the_default_while_compiling_and_backend_forces_one(fake_engines, monkeypatch):
    ran, timings = fake_engines
    timings.update(triton=1.0, torch_varlen=0.4, flash_attn=0.7)
    default = _dispatch.Impl("varlen_attention", "triton", lambda *a, **k: "default", ("cuda",))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert engines.engine_for(default, *_call_args(), deterministic=False) is default.fn and not ran
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    args, kwargs = _call_args()
    engines.engine_for(default, args, kwargs, deterministic=False)  # timed outside the trace
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    ran.clear()
    engines.engine_for(default, args, kwargs, deterministic=False)(*args, **kwargs)
    assert ran == ["torch_varlen"], "a regime timed before the trace keeps its engine in it"
    monkeypatch.undo()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the engine choice ran for a call that named its backend")

    monkeypatch.setattr(engines, "engine_for", must_not_run)
    q = torch.randn(6, 2, 16)
    fk.varlen_attention(q, q, q, torch.tensor([0, 6], dtype=torch.int32), 6, backend="reference")


@pytest.fixture
def torch_varlen_on_cpu(monkeypatch):
    """torch's varlen_attn runs on the CPU here through our own implementation registered for the CPU key
    (CPU torch has no flash kernel of its own); the torch_varlen backend function is called directly."""
    from flagdit_kernels.ops import attention_torch_flash, attention_torch_varlen

    if attention_torch_varlen.torch_varlen_attn() is None:
        pytest.skip("torch has no varlen_attn")
    handle = attention_torch_flash.register("CPU")
    yield attention_torch_varlen
    handle.remove()


def test_torch_varlen_composes_text_gate_lse_and_empty_keys(torch_varlen_on_cpu):
    gen = torch.Generator().manual_seed(4)

    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).float()

    inputs = dict(q=rnd(25, 4, 16), k=rnd(18, 2, 16), v=rnd(18, 2, 16), text_k=rnd(5, 2, 16), text_v=rnd(5, 2, 16))
    inputs["gate"] = rnd(4)
    cu = torch.tensor([0, 9, 13, 25], dtype=torch.int32)
    fixed = dict(cu_seqlens=cu, max_seqlen=12, softmax_scale=0.3, text_max_seqlen=3, return_lse=True)
    fixed.update(text_cu_seqlens=torch.tensor([0, 3, 5, 5], dtype=torch.int32))
    fixed.update(cu_seqlens_k=torch.tensor([0, 6, 6, 18], dtype=torch.int32), max_seqlen_k=12)
    finite = torch.ones(25, dtype=torch.bool)
    finite[9:13] = False  # the sample without keys: LSE -inf on both sides

    def mine(**t):
        out, lse = torch_varlen_on_cpu._varlen_attention_torch(**t, **fixed)
        assert torch.isneginf(lse[:, ~finite]).all()
        return out, lse[:, finite]

    def expected(**t):
        out, lse = ref.varlen_attention(**t, **fixed)
        return out, lse[:, finite]

    compare_with_reference(mine, expected, inputs, torch.float32, family="attention")
    with pytest.raises(ValueError, match="deterministic backward only under"):
        torch_varlen_on_cpu._varlen_attention_torch(**inputs, **fixed, deterministic=True)


def test_torch_varlen_steps_aside_while_flagdit_is_active():
    from flagdit_kernels.ops import attention_torch_varlen

    if attention_torch_varlen.torch_varlen_attn() is None:
        pytest.skip("torch has no varlen_attn")
    attention = torch.nn.attention
    assert attention_torch_varlen._why_missing() == ""
    attention.activate_flash_attention_impl("FLAGDIT")
    try:
        assert "FLAGDIT" in attention_torch_varlen._why_missing()
    finally:
        attention.restore_flash_attention_impl()


def test_a_timed_choice_is_traced_without_graph_breaks(fake_engines):
    ran, timings = fake_engines
    timings.update(triton=1.0, torch_varlen=0.4, flash_attn=0.7)
    default = _dispatch.Impl("varlen_attention", "triton", lambda *a, **k: a[0] * 2.0, ("cuda",))
    args, kwargs = _call_args()
    engines.engine_for(default, args, kwargs, deterministic=False)  # timed eagerly first

    def call(q):
        fn = engines.engine_for(default, (q, *args[1:]), kwargs, deterministic=False)
        return fn(q, *args[1:], **kwargs)

    ran.clear()
    out = torch.compile(call, fullgraph=True, backend="eager")(args[0])
    assert ran == ["torch_varlen"] and torch.equal(out, args[0])
