"""The GPU check's measurement plan: which (case, implementation) pairs to time, in which order, in groups.

A short GPU window is spent in order of information per second: our attention kernels first (the largest
unknowns), then the bandwidth-bound ops with the baselines that cost nothing to set up, then the baselines that
cost compiles (FlexAttention, cuDNN, ``torch.compile`` chains), then the model step, then everything else.
``benchmarks/gpu_check.sh`` gives each group a time budget; ``benchmarks/conftest.py`` (``--bench-plan``)
selects and orders the pytest-benchmark items by it, and ``flagdit-bench warm --plan``
compiles the same pairs in the same order.

A selector matches a case's op, shape, direction and implementation label with shell-style wildcards
(``fnmatch``, case-sensitive; ``a|b`` matches either; :class:`~flagdit_kernels.bench.cases.Select`); a pair
belongs to the first group holding a selector that matches it and is ordered by that selector's position, then
by collection order. An op family may declare where its cases go (``PLAN``: group -> selectors, in its module
under ``families/``, beside the cases they select); the groups below take them in the order they list the
families. ``reference`` (our PyTorch spec, no baseline) is timed last, in the ``rest`` group.
"""

from __future__ import annotations

from collections.abc import Iterable

from .cases import OURS, Select
from .families import norms, packing, rope

# Full-size shapes on a GPU (the shapes of flagdit_kernels.bench.families.* and flagdit.bench.* without --bench-quick).
GPU_PLAN: dict[str, tuple[Select, ...]] = {
    "attention": (
        Select("varlen_attention", "packed*-D128*", impl=OURS),
        Select("varlen_attention", "packed*-D72*", impl=OURS),
        Select("attention_dense", impl="triton|SDPA flash"),
        Select("lumina_gated_attention", impl="fk*"),
        Select("tile_sparse_attention", "video720p*", impl=OURS),  # issue 27: dense vs window vs top-k
        Select("tile_sparse_attention", impl=OURS),
        # torch's varlen_attn (what users compare us with on packed batches) and the engine choice.
        Select("varlen_attention|attention_dense", impl="torch_varlen|varlen_attn|fk auto|flash_attn"),
    ),
    # The memory-bound families place their own cases (each family module's PLAN), in this order.
    "bandwidth": tuple(select for family in (norms, rope, packing) for select in family.PLAN["bandwidth"]),
    "baselines": (
        Select("varlen_attention", "packed*", impl="flex docmask"),
        Select("tile_sparse_attention", impl="flex blockmask"),
        Select("attention_dense", impl="SDPA cudnn"),
        Select("varlen_attention", "packed*", impl="padded SDPA"),
        Select("lumina_gated_attention", impl="lumina eager|torch.compile"),
    ),
    "model": (
        Select("model_train_step", "flag-dit-600m*", impl=OURS),
        Select("model_sample_step", "flag-dit-600m*", impl=OURS),
        Select("model_*_step", "flag-dit-600m*", impl="reference"),
        Select("diffusers_lumina_next", impl="fk*|diffusers eager"),
    ),
    "rest": (Select("*"),),
}

# The CPU dry run of gpu_check.sh (small shapes, no Triton timings: interpreted kernels measure the
# interpreter): the same groups over a few cases that run in milliseconds on a CPU, from the families whose
# collection costs no torch.compile import (attention's phase collects only its own family).
DRY_RUN_PLAN: dict[str, tuple[Select, ...]] = {
    "attention": (Select("attention_dense", direction="fwd", impl="SDPA"),),
    "bandwidth": (
        Select("pack", "mixed*", "fwd", "cpu"),
        Select("pack", "mixed*", "fwd", "python loop"),
        Select("unpack", "mixed*", "fwd", "cpu"),
    ),
    "baselines": (Select("unpack", "mixed*", "fwd", "python loop"),),
    "model": (Select("model_sample_step", impl="reference"),),
}

PLANS = {"gpu": GPU_PLAN, "dry-run": DRY_RUN_PLAN}


def group_of(plan: dict[str, tuple[Select, ...]], op: str, shape: str, direction: str, impl: str):
    """``(group, rank)`` of one pair (rank orders pairs across the whole plan), or None when no selector
    matches."""
    rank = 0
    for group, selectors in plan.items():
        for selector in selectors:
            if selector.matches(op, shape, direction, impl):
                return group, rank
            rank += 1
    return None


def order(plan: dict[str, tuple[Select, ...]], groups: Iterable[str], pairs: Iterable[tuple]) -> list[tuple]:
    """``(group, pair)`` for the pairs that fall in ``groups``, in plan order (stable within a selector).
    Each pair is ``(op, shape, direction, impl, *anything)``."""
    wanted = set(groups)
    unknown = wanted - set(plan)
    if unknown:
        raise ValueError(f"unknown plan groups {sorted(unknown)}; the plan has {list(plan)}")
    ranked = []
    for index, pair in enumerate(pairs):
        found = group_of(plan, *pair[:4])
        if found is not None and found[0] in wanted:
            ranked.append((found[1], index, found[0], pair))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(group, pair) for _, _, group, pair in ranked]
