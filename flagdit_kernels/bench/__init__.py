"""Benchmark cases shared by ``flagdit-bench`` and the pytest-benchmark suites in ``benchmarks/``.

Each op family has a module here (``norms``, ``rope``, ``attention``, ``packing``) with a ``cases(quick, device)``
function returning :class:`~flagdit_kernels.bench.cases.Case` objects: one shape, one direction, and a
builder per implementation (our backends and the baselines users know). Whole-model families live in
``flagdit.bench``; :mod:`flagdit_kernels.bench.cases` finds both.
"""
