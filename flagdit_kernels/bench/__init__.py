"""Measurement, in one home: what to time, timing it, reading a run back, and the compile tools that measure
without a GPU. One entry point, ``flagdit-bench`` (also ``python -m flagdit_kernels.bench``; ``cli.py``):

- ``flagdit-bench``: every op on every available backend and the baselines, one table (``cli.py``, ``timing.py``);
- ``flagdit-bench report``: benchmark JSON or a GPU check's results log -> Markdown and a PNG (``results/``);
- ``flagdit-bench warm``: the compile caches filled before a timed run (``warm.py``, in ``plan.py``'s order);
- ``flagdit-bench compile-report`` / ``bandwidth-report``: what the attention / bandwidth kernels compile to
  for sm_90, on a CPU (``compile/``).

Rooms: ``cases.py`` (the :class:`~flagdit_kernels.bench.cases.Case` type and the registry of families),
``families/`` (one module per op family with ``cases(quick, device)``; the whole-model families live with the
model in ``flagdit.bench``, above the kernels, and the registry finds both), ``timing.py`` (timing and the
measured ceilings), ``tuning.py`` (the attention tiles and engines chosen so far, recorded with a benchmark),
``plan.py`` (the GPU check's measurement plan), ``warm.py``, ``results/`` (run log, rows, per-op record,
report: JSON in, Markdown out, no kernel), ``compile/`` (recorder, SASS reader, the two compile reports;
imported by nothing but the entry point). ``benchmarks/`` at the repository root holds what users run
(``pytest benchmarks/ --benchmark-only``, ``gpu_check.sh``) and the results log's writer, a pytest plugin that
must load before this package.
"""
