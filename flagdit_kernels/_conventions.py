"""The conventions every layer agrees on, kept below all of them: the reference spec, the ops, ``fk.nn``, the
benchmarks and the compile tools read them here, so none of them reaches sideways into another's module (or a
private name) for a number or a shape rule. Plain Python only: nothing from the package, no torch.
"""

from __future__ import annotations

EPS = 1e-5  # the default epsilon of the RMSNorm family (and of fk.nn's RMSNorm modules)
QK_NORM_EPS = 1e-5  # qk_norm_rope's default epsilon (LayerNorm's), also fk.nn.QKNormRoPE's
LAYER_NORM_EPS = 1e-6  # layer_norm_modulate's default epsilon: the DiT final layers' (Flag-DiT, Flux, SD3)


def frames_hw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(F, H, W) of a (C, H, W) or (C, F, H, W) latent shape."""
    return (1, shape[1], shape[2]) if len(shape) == 3 else (shape[1], shape[2], shape[3])


def item_shapes(shapes: list[tuple[int, ...]]) -> list[int]:
    """(ndim, F, H, W) per item, flattened, as the unpack launchers take them."""
    return [v for s in shapes for v in (len(s), *frames_hw(s))]
