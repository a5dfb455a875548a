import pytest
import torch

import flagdit_kernels as fk
from flagdit_kernels import _dispatch


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


def test_cpu_tensors_never_need_a_gpu(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    name, _ = _dispatch.resolve("rms_norm", torch.device("cpu"))
    assert name in ("cpu", "reference")


def test_compiled_pack_is_the_cpu_default_when_built(monkeypatch):
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    name, _ = _dispatch.resolve("pack", torch.device("cpu"))
    expected = "cpu" if fk.backend_info()["extension"] == "loaded" else "reference"
    assert name == expected


def test_backend_argument_overrides_and_rejects_unknown():
    x = torch.randn(3, 8)
    assert torch.equal(fk.rms_norm(x, None, backend="reference"), fk.reference.rms_norm(x, None))
    with pytest.raises(ValueError, match="backend must be one of"):
        fk.rms_norm(x, None, backend="tpu")


def test_unavailable_backend_is_a_clear_error():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"rms_norm: .*cuda"):
        fk.rms_norm(x, None, backend="cuda")


def test_environment_variable_prefers_a_backend_and_falls_back(monkeypatch):
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _dispatch.resolve("pack", torch.device("cpu"))[0] == "reference"
    monkeypatch.setenv(_dispatch.ENV_VAR, "cuda")  # cannot run CPU tensors: the default applies
    assert _dispatch.resolve("rms_norm", torch.device("cpu"))[0] in ("cpu", "reference")
    monkeypatch.setenv(_dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="FLAGDIT_KERNELS_BACKEND"):
        _dispatch.resolve("rms_norm", torch.device("cpu"))


def test_unknown_op_is_reported():
    with pytest.raises(ValueError, match="unknown op"):
        fk.available_backends("layer_norm_v2")


def test_backend_info_says_what_is_there():
    info = fk.backend_info()
    assert info["torch"] == torch.__version__
    assert set(info["ops"]) >= {"rms_norm", "pack", "varlen_attention"}
    assert info["extension"] == "loaded" or info["extension"].startswith("missing: ")
