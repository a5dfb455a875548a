"""What the attention autotuner and engine chooser kept so far in this process, for a benchmark to record beside
its figures (``flagdit-bench report`` lists it). Read only where the attention kernels are already loaded: a
benchmark of another op neither imports them nor changes their autotune mode."""

from __future__ import annotations

import sys

LAUNCH = "flagdit_kernels.triton.attention.launch"


def chosen_tiles() -> dict[str, dict[str, str]]:
    """``{kernel: {tuning key: config}}`` of the tiles the autotuner chose, with ``"engine": {regime: engine}``
    where the engine chooser measured one; ``{}`` when the attention kernels are not loaded or do not autotune
    (``FLAGDIT_KERNELS_AUTOTUNE`` other than 1)."""
    if LAUNCH not in sys.modules:
        return {}
    from ..ops import attention_engines
    from ..triton.attention import launch

    if launch.AUTOTUNE_MODE != "1":
        return {}
    engines = attention_engines.chosen()
    return {**launch.tuned_tiles(), **({"engine": engines} if engines else {})}
