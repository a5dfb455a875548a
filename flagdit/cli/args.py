"""Argument types and the help formatter shared by ``flagdit-train`` and ``flagdit-sample``: every bad value is
an argparse error that names the option, and every option's help states its default."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable


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


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (``PROG: error: ...``, exit status 2): the usage
    text is what ``--help`` is for."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_main(prog: str, body: Callable[[], object], debug: bool, known: tuple[type, ...] = ()) -> object:
    """Runs a CLI's work; an exception becomes one line on stderr, ``PROG: error: ...``, and exit status 1
    (``--debug``: the traceback instead). The errors of our own checks (``ValueError``, ``OSError``,
    ``ImportError`` and the ``known`` types) read as their message; anything else is named by its type, the
    first line of its message and a pointer to --debug."""
    try:
        return body()
    except Exception as e:
        if debug:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        text = lines[0] if lines else ""
        if not isinstance(e, (ValueError, OSError, ImportError, *known)):
            text = f"{type(e).__name__}: {text} (run with --debug for the traceback)"
        elif isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
            text = f"{text}: {e.filename}"
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


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
MAX_SEED = 2**32 - 1  # the data and noise seeds are derived from it in 64-bit integers
seed = _bounded(int, f"an integer seed in [0, {MAX_SEED}]", low=0, high=MAX_SEED)


def bounded_int(low: int, high: int):
    """An argparse type for an integer in [low, high]."""
    return _bounded(int, f"an integer in [{low}, {high}]", low=low, high=high)


def backend_problem(backend: str | None, device_type: str) -> str | None:
    """Why ``backend`` (and ``FLAGDIT_KERNELS_BACKEND``) cannot run a model on ``device_type``, or None."""
    import flagdit_kernels as fk

    info = fk.backend_info()
    forced = os.environ.get("FLAGDIT_KERNELS_BACKEND")
    if forced and forced not in fk.BACKENDS:
        return f"FLAGDIT_KERNELS_BACKEND={forced!r} is not a backend; unset it or choose one of {fk.BACKENDS}"
    if backend is None:
        return None
    usable = {b for op in info["ops"] for b in fk.available_backends(op, device_type)}
    if backend not in usable:
        detail = f" ({info['triton_status']})" if backend == "triton" and info.get("triton_status") else ""
        return (
            f"--backend {backend} cannot run on this machine's {device_type}{detail}; available here: "
            f"{', '.join(sorted(usable))}"
        )
    return None


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


def triple(text: str) -> tuple[int, int, int]:
    """``A,B,C``: three integers >= 1 (frames, rows, cols), e.g. an attention tile or window."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three integers >= 1 as FRAMES,ROWS,COLS (e.g. 2,3,3), got {text!r}")
    return values


triple.__name__ = "FRAMES,ROWS,COLS"


def add_attention_options(p: argparse.ArgumentParser) -> None:
    """--attention-window / --attention-top-k / --attention-tile: tile-sparse self-attention (issue 27). Not a
    property of the weights: a dense checkpoint trains on or samples sparse."""
    from ..model import DEFAULT_ATTENTION_TILE

    default_tile = ",".join(map(str, DEFAULT_ATTENTION_TILE))
    p.add_argument("--attention-window", type=triple, metavar="WT,WH,WW",
                   help="tile-sparse self-attention (Sliding Tile Attention): each query tile attends the key tiles "
                        "of this window of tiles around it (frames, rows, cols); placeholders and text stay dense "
                        "(default: dense attention)")  # fmt: skip
    p.add_argument("--attention-top-k", type=positive_int, metavar="K",
                   help="tile-sparse self-attention (Video Sparse Attention's selection): each query tile attends the "
                        "K key tiles whose mean keys score highest against its mean query; with --attention-window, "
                        "the union (default: dense attention)")  # fmt: skip
    p.add_argument("--attention-tile", type=triple, metavar="TT,TH,TW",
                   help="patches per attention tile (frames, rows, cols): the latents are packed tile-major "
                        f"(default: {default_tile} under --attention-window / --attention-top-k, else raster "
                        "order)")  # fmt: skip


def attention_settings(args: argparse.Namespace):
    """``(fk.TileSparsity or None, tile or None)`` of the --attention-* options, for ``FlagDiT``'s
    ``attention_sparsity`` / ``attention_tile``."""
    import flagdit_kernels as fk

    if args.attention_window is None and args.attention_top_k is None:
        return None, args.attention_tile
    return fk.TileSparsity(window=args.attention_window, top_k=args.attention_top_k), args.attention_tile


def describe_attention(model) -> str:
    """The attention a model runs, for logs: "dense", "dense, tile-major 1,2,2" or "window=2,3,3 top_k=4, tile
    1,2,2" (" + coarse" after the pattern when the config adds the coarse branch)."""
    text = lambda values: ",".join(map(str, values))
    sparsity, tile = model.attention_sparsity, model.pack_tile
    coarse = " + coarse" if model.config.coarse_attention else ""
    if sparsity is None:
        return "dense" if tile is None else f"dense{coarse}, tile-major {text(tile)}"
    parts = [f"window={text(sparsity.window)}"] if sparsity.window is not None else []
    parts += [f"top_k={sparsity.top_k}"] if sparsity.top_k is not None else []
    return f"{' '.join(parts)}{coarse}, tile {text(tile)}"
