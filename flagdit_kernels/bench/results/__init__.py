"""Reading a benchmark run back: the GPU check's results log (``run_log``), the rows and verdicts of a report
(``rows``), the per-op record of ``benchmarks/RESULTS.md`` (``record``) and the Markdown / PNG report
(``report``, run as ``flagdit-bench report``)."""
