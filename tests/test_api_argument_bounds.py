"""Integers and switches of the kernel API (issue 25, item 13): values nothing can use are refused up front with
an error naming the argument, and ``FLAGDIT_KERNELS_VALIDATE`` takes the usual spellings or says it did not."""

from __future__ import annotations

import warnings

import pytest
import torch
from support.helpers import DEVICE, fresh

import flagdit_kernels as fk
from flagdit_kernels import _validation

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # values_checked only reads the device type: no GPU needed


@pytest.mark.parametrize("max_seqlen", [2**31, 2**63, 2**64 + 5])
@pytest.mark.parametrize("backend", fk.available_backends("varlen_attention", DEVICE))
def test_max_seqlen_beyond_int32_offsets_is_refused(backend, max_seqlen):
    q = fresh((6, 2, 16), torch.float32, seed=1)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=f"max_seqlen must be at most {2**31 - 1}, got {max_seqlen}"):
        fk.varlen_attention(q, q, q, cu, max_seqlen, backend=backend)
    with pytest.raises(ValueError, match="max_seqlen must be at most"):
        fk.VarlenLayout.from_cu_seqlens(cu, 6, max_seqlen)


def test_the_largest_int32_max_seqlen_is_accepted():
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    assert fk.VarlenLayout.from_cu_seqlens(cu, 6, 2**31 - 1).max_seqlen == 2**31 - 1


@pytest.mark.parametrize("num_tokens", [True, False, 6.0, "6", None])
def test_num_tokens_of_another_type_is_a_type_error(num_tokens):
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match=f"num_tokens must be an int, got {type(num_tokens).__name__}"):
        fk.VarlenLayout.from_cu_seqlens(cu, num_tokens)


@pytest.fixture
def validate_env(monkeypatch):
    monkeypatch.setattr(_validation, "_warned_validate", set())

    def setenv(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(_validation.VALIDATE_VAR, raising=False)
        else:
            monkeypatch.setenv(_validation.VALIDATE_VAR, value)

    return setenv


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "Yes", "on", " On "])
def test_validate_on_spellings(validate_env, value):
    validate_env(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _validation.values_checked(CUDA)


@pytest.mark.parametrize("value", [None, "", "0", "false", "False", "NO", "off"])
def test_validate_off_spellings(validate_env, value):
    validate_env(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _validation.values_checked(CUDA)
        assert _validation.values_checked(CPU)  # CPU tensors are always checked: it costs no sync


@pytest.mark.parametrize("value", ["2", "enable", "y", "ja"])
def test_other_values_warn_once_and_leave_validation_off(validate_env, value):
    validate_env(value)
    with pytest.warns(UserWarning) as record:
        assert not _validation.values_checked(CUDA)
    (message,) = [str(w.message) for w in record]
    assert _validation.VALIDATE_VAR in message and repr(value) in message
    for spelling in ("1/true/yes/on", "0/false/no/off"):
        assert spelling in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per value
        assert not _validation.values_checked(CUDA)
        assert _validation.values_checked(CPU)
