"""Engine choice by measurement: on a GPU, ``fk.varlen_attention`` runs whichever engine is fastest here.

The engines are the backends that implement the whole ``varlen_attention`` contract: our Triton kernels
(``triton``, the default), torch's ``varlen_attn`` with our text branch, gate and RoPE composed around it
(``torch_varlen``) and flash-attn composed the same way (``flash_attn``, where installed). The first time a
regime is seen (card, dtype, head dim, heads, GQA ratio, text / RoPE / cross flags, a bucket of the sequence
length, whether a backward follows, the engines offered, the torch and Triton versions) each engine that can run
the call is timed on the call's own inputs (forward, plus backward when the inputs require grad; our Triton
kernels tune their tiles during the warm-up runs) and the fastest is kept, in memory and on disk beside the
attention tile cache, with its safety rules (``triton/attention/autotune.py``: the same directory, one JSON
file per key written atomically, a file trusted only if it parses, names exactly this key and an engine among
those offered, else re-timed with one warning; an unwritable directory keeps results in memory).

When it applies: CUDA inputs, no ``backend=`` / ``prefer=`` / ``FLAGDIT_KERNELS_BACKEND`` (they still force
one), FLAGDIT_KERNELS_AUTOTUNE=1 (the default; ``0`` runs the default engine untimed). ``deterministic=True``
(or ``torch.use_deterministic_algorithms``) only considers deterministic engines. While torch.compile traces,
a regime already timed keeps its engine and an untimed one takes the default (nothing can be timed in a
trace). :func:`chosen` (also in ``fk.backend_info()`` and the benchmark report) says what each regime chose.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import torch

from .. import _dispatch

ENGINES = ("triton", "torch_varlen", "flash_attn")  # the default first
DETERMINISTIC = {"triton": True, "flash_attn": True, "torch_varlen": False}
CACHE_VERSION = 1

_chosen: dict[str, str] = {}  # key -> engine, this process
_fast: dict[tuple, Callable] = {}  # engine_for's per-call lookup of the same choices


def chosen() -> dict[str, str]:
    """{regime, readably: engine} of what this process chose."""
    out = {}
    for key, engine in _chosen.items():
        fields = json.loads(key)
        names = ("device", "dtype", "head_dim", "heads", "gqa", "text", "rope", "cross", "seq", "backward")
        out[" ".join(f"{n}={fields.get(n)}" for n in names)] = engine
    return out


def regime(q, k, max_seqlen: int, *, text: bool, rope: bool, cross: bool, backward: bool, deterministic: bool):
    """The fields that can change which engine is fastest."""
    from ..triton.attention import autotune as tuning

    return {
        **tuning.device_fields(q.device),
        "dtype": str(q.dtype).removeprefix("torch."),
        "head_dim": q.shape[-1], "heads": q.shape[1], "gqa": q.shape[1] // k.shape[1], "text": text,
        "rope": rope, "cross": cross, "seq": tuning.seq_bucket(max_seqlen), "backward": backward,
        "deterministic": deterministic, "torch": torch.__version__, "triton": tuning.TRITON_VERSION,
    }  # fmt: skip


def _read(path: str, key: str, offered: list[str], warn: Callable[[str, str], None]) -> str | None:
    """The engine a cache file names, if the file is this key's and the engine one of those offered."""

    def offered_engine(data: dict) -> str | None:
        return data["engine"] if data["engine"] in offered else None

    from ..triton.attention import autotune as tuning

    return tuning.read_cache(path, key, CACHE_VERSION, offered_engine, "engine", "re-timing", warn)


def _write(path: str, key: str, engine: str, timings: dict[str, float], warn: Callable[[str, str], None]) -> None:
    from ..triton.attention import autotune as tuning

    data = {"version": CACHE_VERSION, "key": key, "engine": engine, "timings_ms": timings}
    tuning.write_cache(path, data, "engine", warn)


def choose(
    fields: dict,
    candidates: dict[str, Callable[[], object]],
    *,
    measure: Callable[[Callable[[], object]], float],
    directory: str,
    warn: Callable[[str, str], None],
) -> str:
    """The fastest of ``candidates`` (engine -> a closure running the call) for the regime ``fields``: this
    process's choice, else a trusted cache file's, else measured now (an engine that fails is left out)."""
    key = json.dumps({**fields, "engines": sorted(candidates)}, sort_keys=True, default=str)
    if key in _chosen:
        return _chosen[key]
    path = os.path.join(directory, f"engine-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")
    engine = _read(path, key, list(candidates), warn)
    if engine is None:
        timings, errors = {}, {}
        for name, run in candidates.items():
            try:
                timings[name] = measure(run)
            except (RuntimeError, ValueError) as exc:  # out of memory, a kernel the card cannot hold, ...
                errors[name] = f"{type(exc).__name__}: {exc}"
        if not timings:
            raise RuntimeError(f"no attention engine ran this call: {errors}")
        engine = min(timings, key=timings.get)
        _write(path, key, engine, timings, warn)
    _chosen[key] = engine
    return engine


def _timed_call(fn: Callable, args: tuple, kwargs: dict, backward: bool) -> Callable[[], object]:
    """A closure running the call (forward, and backward on fresh leaves when ``backward``)."""
    if not backward:

        def forward() -> None:
            with torch.no_grad():
                fn(*args, **kwargs)

        return forward

    def leaf(x):
        grad = isinstance(x, torch.Tensor) and x.requires_grad
        return x.detach().requires_grad_() if grad else x

    args = tuple(leaf(a) for a in args)
    kwargs = {n: leaf(x) for n, x in kwargs.items()}

    def step() -> None:
        out = fn(*args, **kwargs)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return step


def engine_for(default: _dispatch.Impl, args: tuple, kwargs: dict, *, deterministic: bool) -> Callable:
    """The function ``varlen_attention`` runs: ``default``'s (the resolved backend), or the fastest engine."""
    from ..triton.attention import autotune as tuning

    if tuning.AUTOTUNE_MODE != "1":
        return default.fn
    q, k = args[0], args[1]
    text, rope, cross = kwargs.get("text_k") is not None, kwargs.get("freqs") is not None, "cu_seqlens_k" in kwargs
    backward = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (*args, *kwargs.values())
    )
    # This process's choice, by plain Python values (no device query: cheap per call, and traceable).
    seen = (q.device, q.dtype, q.shape[-1], q.shape[1], k.shape[1], text, rope, cross, backward, deterministic,
            tuning.seq_bucket(args[4]))  # fmt: skip
    fn = _fast.get(seen)
    if fn is not None:
        return fn
    if torch.compiler.is_compiling():  # nothing can be timed in a trace
        return default.fn
    names = []
    for name in ENGINES:
        if deterministic and not DETERMINISTIC[name]:
            continue
        try:
            names.append(_dispatch.resolve("varlen_attention", q, backend=name).backend)
        except ValueError:  # not installed, or not for this device / dtype
            continue
    impls = {name: _dispatch.resolve("varlen_attention", q, backend=name).fn for name in names}
    if len(impls) < 2:
        fn = default.fn
    else:
        fields = regime(q, k, args[4], text=text, rope=rope, cross=cross, backward=backward,
                        deterministic=deterministic)  # fmt: skip
        candidates = {name: _timed_call(f, args, kwargs, backward) for name, f in impls.items()}
        engine = choose(fields, candidates, measure=tuning.measure, directory=tuning.cache_dir(),
                        warn=tuning._warn_once)  # fmt: skip
        fn = impls[engine]
    _fast[seen] = fn
    return fn
