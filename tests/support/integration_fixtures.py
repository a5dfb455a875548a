"""Helpers shared by the integration tests (diffusers patching and patch_rms_norm)."""

from __future__ import annotations

import pytest
import torch
from support.helpers import DEVICE, TRITON_RUNS
from torch import nn

import flagdit_kernels as fk


def backends(ops: tuple[str, ...]) -> list:
    """``reference``, and ``triton`` when every op in ``ops`` has a runnable triton backend here.

    A patched model calls several ops: the triton run only means something when all of them resolve to triton.
    """
    params = [pytest.param("reference", id="reference")]
    have = TRITON_RUNS and all("triton" in fk.available_backends(op, DEVICE) for op in ops)
    params.append(
        pytest.param(
            "triton",
            id="triton",
            marks=pytest.mark.skipif(not have, reason="triton backends of every op need TRITON_INTERPRET=1 or a GPU"),
        )
    )
    return params


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order and bit-identical tensors."""
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for key, value in state.items():
        assert torch.equal(value, snapshot[key]), key
