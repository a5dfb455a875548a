"""Reversible per-instance forward swaps: the machinery under ``patch_rms_norm`` and the diffusers patches.

A patched module keeps its class, parameters, buffers, hooks and state_dict; only an instance-level
``forward`` is installed (``module.__dict__["forward"]``, which ``nn.Module.__call__`` finds before the class
method) together with a small state record. Undoing deletes both and puts back an instance-level forward
that was there before (accelerate's offload hooks install one), so the module is exactly what it was.

Caveats: patch before adding accelerate / diffusers offload hooks (hooks added later wrap the patched forward;
hooks added earlier are bypassed while patched). Save ``state_dict()`` (unchanged by patching); pickling a
whole patched module is not supported (unpatch first).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

STATE_ATTR = "_flagdit_kernels_patch"


@dataclass
class PatchState:
    """What a patched module remembers: the swap's kind, the backend its ops run on, the instance-level
    forward it replaced (None when the class method was in use), and how often (and why) it fell back to that."""

    kind: str
    backend: str | None
    saved_forward: Callable | None
    extra: dict[str, Any] = field(default_factory=dict)
    fallback_calls: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)  # reason -> calls

    def run_original(self, module: nn.Module, *args, **kwargs):
        """Runs the forward the module had before patching."""
        if self.saved_forward is not None:
            return self.saved_forward(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)

    def call_original(self, module: nn.Module, reason: str, *args, **kwargs):
        """Falls back to the forward the module had before patching, counting the call under ``reason``."""
        self.fallback_calls += 1
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        return self.run_original(module, *args, **kwargs)


@dataclass
class PatchReport:
    """Result of a patch or unpatch call. Keys are qualified module names (``""`` is the root module).

    ``swapped``: modules whose forward now runs our ops, with what runs it; ``already``: modules an earlier
    call patched (left as they are); ``skipped``: modules that looked like candidates but were left alone,
    with the reason; ``restored``: modules an unpatch call gave their original forward back.
    """

    swapped: dict[str, str] = field(default_factory=dict)
    already: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    restored: dict[str, str] = field(default_factory=dict)

    def merge(self, other: PatchReport) -> PatchReport:
        for mine, theirs in (
            (self.swapped, other.swapped),
            (self.already, other.already),
            (self.skipped, other.skipped),
            (self.restored, other.restored),
        ):
            for key, value in theirs.items():
                mine.setdefault(key, value)
        return self

    def __str__(self) -> str:
        lines = []
        for title, entries in (
            ("swapped", self.swapped),
            ("already patched", self.already),
            ("skipped", self.skipped),
            ("restored", self.restored),
        ):
            if entries:
                lines.append(f"{title} ({len(entries)}):")
                lines.extend(f"  {name or '<root>'}: {what}" for name, what in entries.items())
        return "\n".join(lines) if lines else "nothing to do"


def state_of(module: nn.Module) -> PatchState | None:
    return module.__dict__.get(STATE_ATTR)


def is_patched(module: nn.Module) -> bool:
    return STATE_ATTR in module.__dict__


def install(module: nn.Module, kind: str, forward: Callable, backend: str | None, **extra: Any) -> PatchState | None:
    """Binds ``forward(module, *args, **kwargs)`` as ``module``'s instance forward; None if already patched."""
    if is_patched(module):
        return None
    state = PatchState(kind, backend, module.__dict__.get("forward"), dict(extra))
    module.__dict__[STATE_ATTR] = state
    module.__dict__["forward"] = types.MethodType(forward, module)
    return state


def uninstall(module: nn.Module) -> PatchState | None:
    """Restores the forward ``module`` had before :func:`install`; returns the removed state (or None)."""
    state = module.__dict__.pop(STATE_ATTR, None)
    if state is None:
        return None
    module.__dict__.pop("forward", None)
    if state.saved_forward is not None:
        module.__dict__["forward"] = state.saved_forward
    return state


def unpatch(model: nn.Module, kinds: tuple[str, ...] | None = None) -> PatchReport:
    """Undoes every flagdit-kernels patch under ``model`` (or only those of the given kinds).

    Afterwards the modules run their own forward again, bit for bit as before patching.
    """
    report = PatchReport()
    for name, module in model.named_modules(remove_duplicate=True):
        state = state_of(module)
        if state is None or (kinds is not None and state.kind not in kinds):
            continue
        uninstall(module)
        report.restored[name] = state.kind
    return report
