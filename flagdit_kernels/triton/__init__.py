"""Triton kernels (no autograd, no dispatch). Import a kernel module only when Triton is installed."""
