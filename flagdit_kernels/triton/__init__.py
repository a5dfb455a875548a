"""Triton kernels (no autograd, no dispatch): one module per op family, imported lazily by ``flagdit_kernels.ops``."""
