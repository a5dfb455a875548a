"""Argument types and the help formatter shared by ``flagdit-train`` and ``flagdit-sample``: every bad value is
an argparse error that names the option, and every option's help states its default."""

from __future__ import annotations

import argparse
import math


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to every option whose help does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def _bounded(kind: type, what: str, low: float | None = None, high: float | None = None, open_low: bool = False):
    """An argparse type: ``kind(text)``, finite, and within [low, high] (``(low, high]`` with ``open_low``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or value > low or (value == low and not open_low))
        ok = ok and (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _bounded(int, "an integer >= 1", low=1)
non_negative_int = _bounded(int, "an integer >= 0", low=0)
positive_float = _bounded(float, "a number > 0", low=0.0, open_low=True)
non_negative_float = _bounded(float, "a number >= 0", low=0.0)
finite_float = _bounded(float, "a finite number")
probability = _bounded(float, "a probability in [0, 1]", low=0.0, high=1.0)


def size(text: str) -> tuple[int, int]:
    """``HxW`` with positive H and W (multiples of the patch size are checked once the model is known)."""
    h, sep, w = text.lower().partition("x")
    try:
        hw = (int(h), int(w)) if sep else None
    except ValueError:
        hw = None
    if hw is None or min(hw) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive integers (e.g. 16x24), got {text!r}")
    return hw
