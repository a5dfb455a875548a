"""Measurement without a GPU: the sm_90 compile reports of the attention kernels (``compile_report``, run as
``flagdit-bench compile-report``) and of the bandwidth kernels (``bandwidth_report``, ``flagdit-bench
bandwidth-report``), and what they share: ``sass`` reads a cubin, ``recorder`` records host launches and
compiles them. They sit on top of the kernels and ops they read; nothing in the package imports them but the
``flagdit-bench`` entry point, when one is named."""
