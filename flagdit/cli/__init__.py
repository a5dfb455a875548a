"""The command lines on the flagdit library: ``flagdit-train`` (train.py) and ``flagdit-sample`` (sample.py), with
the argument types they share (args.py). Nothing in the library imports them."""
