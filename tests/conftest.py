import os

import pytest
import torch

# Tests check results, not tuning: on a GPU each attention variant compiles only its first fitting config
# (test_attention_kernels.py::test_autotuned_launch covers the tuned path). Read when flagdit_kernels is imported.
os.environ.setdefault("FLAGDIT_KERNELS_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
