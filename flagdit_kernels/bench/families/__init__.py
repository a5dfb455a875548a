"""The op families' benchmark cases: one module per family (``norms``, ``rope``, ``attention``, ``packing``), each
with ``cases(quick, device) -> list[Case]``. :mod:`flagdit_kernels.bench.cases` finds every module here that
defines ``cases`` (and those of ``flagdit.bench``, the whole-model families); nothing lists them by hand."""
