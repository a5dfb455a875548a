"""The varlen attention's Triton and Gluon kernels, in one room.

launch.py (the entry points ``ops/attention.py`` calls: forward, backward, offsets, tiles, tuning), fwd.py and
bwd.py (the kernels), tiles.py (tile code both share), offsets.py (offsets repaired for the kernels),
autotune.py (tile choice and its cache), candidates.py and gluon_fwd.py (the Gluon forward, sm_90 only, verified
against the Triton kernel before use). Modules are imported on first use: importing this package loads none.
"""
