import warnings
from types import SimpleNamespace

import pytest
import torch

import flagdit_kernels as fk
from flagdit_kernels import _dispatch

CPU = torch.empty(0)


@pytest.fixture
def environment(monkeypatch):
    """Sets environment variables for one test: the registry reads them once, so it is told to read again."""

    def setenv(name: str, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        _dispatch.reload_environment()

    yield setenv
    monkeypatch.undo()
    _dispatch.reload_environment()


def like(device: str, dtype: torch.dtype = torch.float32):
    """What resolve reads of the deciding tensor (CUDA ones included, on a machine without a GPU)."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 64))


def test_every_contract_op_is_registered_with_a_reference():
    for op in (
        "rms_norm",
        "rms_norm_modulate",
        "gated_residual_rms_norm",
        "rope_freqs",
        "apply_rope",
        "qk_norm_rope",
        "varlen_attention",
        "pack",
        "unpack",
    ):
        assert "reference" in fk.available_backends(op, "cpu")


def test_cpu_tensors_never_need_a_gpu(environment):
    environment(_dispatch.ENV_VAR, None)
    assert _dispatch.resolve("rms_norm", CPU).backend in ("cpu", "reference")


def test_compiled_pack_is_the_cpu_default_when_built(environment):
    environment(_dispatch.ENV_VAR, None)
    expected = "cpu" if fk.backend_info()["extension"] == "loaded" else "reference"
    assert _dispatch.resolve("pack", CPU).backend == expected


def test_backend_argument_overrides_and_rejects_unknown():
    x = torch.randn(3, 8)
    assert torch.equal(fk.rms_norm(x, None, backend="reference"), fk.reference.rms_norm(x, None))
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.rms_norm(x, None, backend="tpu")


def test_unavailable_backend_is_a_clear_error():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"rms_norm: .*cuda"):
        fk.rms_norm(x, None, backend="cuda")


def test_environment_variable_prefers_a_backend_and_falls_back(environment):
    environment(_dispatch.ENV_VAR, "reference")
    assert _dispatch.resolve("pack", CPU).backend == "reference"
    environment(_dispatch.ENV_VAR, "cuda")  # cannot run CPU tensors: the default applies
    assert _dispatch.resolve("rms_norm", CPU).backend in ("cpu", "reference")
    environment(_dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="FLAGDIT_KERNELS_BACKEND"):
        _dispatch.resolve("rms_norm", CPU)


def test_environment_is_read_once(environment, monkeypatch):
    environment(_dispatch.ENV_VAR, None)
    default = _dispatch.resolve("pack", CPU).backend
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")  # not read per call
    assert _dispatch.resolve("pack", CPU).backend == default
    _dispatch.reload_environment()
    assert _dispatch.resolve("pack", CPU).backend == "reference"
    assert fk.backend_info()["forced_backend"] == "reference"


def test_precedence_argument_then_preference_then_environment(environment):
    environment(_dispatch.ENV_VAR, "reference")
    if "cpu" in fk.available_backends("rms_norm", "cpu"):
        assert _dispatch.resolve("rms_norm", CPU, prefer="cpu").backend == "cpu"  # beats the environment
        assert _dispatch.resolve("rms_norm", CPU, backend="reference", prefer="cpu").backend == "reference"
    # An op without the preferred backend goes on to the environment / the default.
    assert _dispatch.resolve("rms_norm_modulate", CPU, prefer="cpu").backend == "reference"
    with pytest.raises(ValueError, match="must be one of"):
        _dispatch.resolve("rms_norm", CPU, prefer="tpu")


def test_a_preferred_backend_that_exists_but_cannot_run_raises():
    # rms_norm has a cuda implementation: a model that asked for it is told, never silently served the reference.
    with pytest.raises(ValueError, match="rms_norm: backend 'cuda' cannot run here"):
        fk.rms_norm(torch.randn(2, 8), None, prefer="cuda")
    with pytest.raises(ValueError, match="rms_norm: backend 'cuda' cannot run here"):
        fk.nn.RMSNorm(8, backend="cuda")(torch.randn(2, 8))


def test_default_skips_backends_that_do_not_take_the_dtype(environment):
    environment(_dispatch.ENV_VAR, None)
    installed = [b for b in ("triton",) if not _dispatch._missing(_dispatch._OPS["varlen_attention"].impls[b])]
    for dtype, want in ((torch.float64, "reference"), (torch.float16, installed[0] if installed else "reference")):
        assert _dispatch.resolve("varlen_attention", like("cuda", dtype)).backend == want
    if installed:
        with pytest.raises(
            ValueError, match="triton' cannot run here: it takes float16, bfloat16, float32, not float64"
        ):
            _dispatch.resolve("varlen_attention", like("cuda", torch.float64), backend="triton")


def test_input_predicates_decide_too(monkeypatch):
    monkeypatch.setitem(_dispatch._OPS, "fake_op", _dispatch._Op("fake_op"))
    _dispatch.register("fake_op", "reference", lambda x: "reference", devices=("cpu", "cuda"))
    narrow = lambda x: "" if x.shape[-1] <= 128 else f"head dims up to 128, got {x.shape[-1]}"
    _dispatch.register("fake_op", "cpu", lambda x: "cpu", devices=("cpu",), accepts=narrow)
    assert _dispatch.resolve("fake_op", torch.empty(2, 64)).backend == "cpu"
    assert _dispatch.resolve("fake_op", torch.empty(2, 256)).backend == "reference"
    with pytest.raises(ValueError, match="head dims up to 128, got 256"):
        _dispatch.resolve("fake_op", torch.empty(2, 256), backend="cpu")
    _dispatch.register("fake_op", "triton", lambda x: "triton", devices=("cuda",), missing=lambda: "not built")
    with pytest.raises(ValueError, match="backend 'triton' cannot run here: not built"):
        _dispatch.resolve("fake_op", torch.empty(2, 64), prefer="triton")
    assert "triton" not in fk.available_backends("fake_op", "cuda")


def test_resolve_traces_to_a_constant_under_torch_compile():
    x = torch.randn(4, 16)
    backends = [None, *fk.available_backends("rms_norm", "cpu")]  # triton too under TRITON_INTERPRET=1

    def fn(x):
        return sum(fk.rms_norm(x, None, backend=b) for b in backends)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Dynamo's warning about tracing through a functools cache
        out = torch.compile(fn, fullgraph=True, backend="eager")(x)
    assert torch.allclose(out, len(backends) * fk.reference.rms_norm(x, None), atol=1e-5)


def test_unknown_op_is_reported():
    with pytest.raises(ValueError, match="unknown op"):
        fk.available_backends("layer_norm_v2")


def test_backend_info_says_what_is_there():
    info = fk.backend_info()
    assert info["torch"] == torch.__version__
    assert set(info["ops"]) >= {"rms_norm", "pack", "varlen_attention"}
    assert info["extension"] == "loaded" or info["extension"].startswith("missing: ")


def test_without_the_extension_everything_runs_on_the_reference():
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.modules['flagdit_kernels._C'] = None\n"
        "import flagdit_kernels as fk\n"
        "info = fk.backend_info()\n"
        "assert info['extension'].startswith('missing: '), info['extension']\n"
        "assert 'cpu' not in fk.available_backends('pack', 'cpu')\n"
        "x = torch.randn(3, 4, 4)\n"
        "p = fk.pack([x], 2)\n"
        "assert torch.equal(fk.unpack(p.patches, p, 3, channels_last=False)[0], x)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
