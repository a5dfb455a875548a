"""Developer tools that run without a GPU: the sm_90 compile reports of the attention kernels
(``python -m flagdit_kernels.tools.compile_report``) and of the bandwidth kernels (``... .bandwidth_report``),
and what they share: ``sass`` reads a cubin, ``recorder`` records host launches and compiles them."""
