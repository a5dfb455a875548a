"""The command lines on the flagdit library: ``flagdit-train`` (train.py; its processes in distributed.py, its
run directory in run_dir.py), ``flagdit-sample`` (sample.py), the argument types they share (args.py), and
``python -m flagdit.cli.long_context_plan`` (writes LONG_CONTEXT.md). Nothing in the library imports them."""
