"""Whole-model benchmark families (``model``: Flag-DiT training and sampling steps; ``diffusers_lumina``:
diffusers' Lumina-Next patched onto our kernels). They sit above the kernels in the import graph, so they live
with the model; ``flagdit-bench`` and ``pytest benchmarks/`` find them beside the op families of
``flagdit_kernels.bench.families`` (``flagdit_kernels.bench.cases.FAMILY_PACKAGES``)."""
