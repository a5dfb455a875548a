"""Triton kernels, one module per op family (kernels and launch helpers only: no autograd, no dispatch)."""
