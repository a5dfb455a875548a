"""The multi-process checks of flagdit.parallel: one gloo job of 4 processes, groups of 4 and of 2.

``python -m support.parallel_checks OUT_DIR`` (with tests/ on the path) spawns 4 processes; each runs every check
for a group of 4 (the world) and for a group of 2 (a 2 x 2 mesh's "sp" dimension) and writes
``OUT_DIR/rank{r}.json`` (check name -> result); the tests in ``test_parallel_sequence.py`` read them. One job
keeps the process start-up (most of the time on a CPU) to one per test run.

Model checks: a tiny Flag-DiT / Next-DiT with every parameter perturbed (its zero-initialized layers would hide
errors) runs once as one process and once sequence-parallel over the group, on the same batch; the record holds
the rel-L2 errors of the output and of every gradient (parameters, latents, caption features). A parallel
rank's parameter gradients are P times its share (see flagdit.parallel.apply), so their mean over the group
is compared.
Saved-bytes checks: what autograd saves for one forward (flagdit.memory.SavedBytes) on a rank of the group,
against one process on the same batch.
Bad-input checks: every rank must raise the ValueError, then meet the others at a barrier (a rank stuck in a
collective would time the job out instead).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from support.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
WORLD = 4


def _model(heads: int, kv_heads: int, variant: str = "flag"):
    import flagdit
    from flagdit.configs import get_config

    extra = {"nextline": False} if variant == "next" else {}
    config = get_config("tiny", dim=16 * heads, n_heads=heads, n_kv_heads=kv_heads, n_layers=2, cap_feat_dim=24,
                        variant=variant, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = flagdit.FlagDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _batch(shapes: list[tuple[int, ...]], caption_lengths: list[int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g) for s in shapes]
    t = torch.rand(len(shapes), generator=g)
    longest = max(max(caption_lengths), 1)
    cap = torch.randn(len(shapes), longest, 24, generator=g)
    mask = (torch.arange(longest)[None] < torch.tensor(caption_lengths)[:, None]).long()
    upstream = [torch.randn(s, generator=g) for s in shapes]
    return xs, t, cap, mask, upstream


def _saved_bytes(model, batch) -> int:
    """What autograd saves for the backward of one forward (flagdit.memory.SavedBytes), then the backward."""
    from flagdit.memory import SavedBytes

    xs, t, cap, mask, upstream = batch
    with SavedBytes(model) as saved:
        out = model(xs, t, cap, mask)
    nbytes = saved.bytes
    sum((o * u).sum() for o, u in zip(out, upstream)).backward()
    return nbytes


def _run(model, batch, mean_over=None):
    """Output and gradients (by name; zeros where autograd gives none) of sum(out * upstream), the gradients
    averaged over the group ``mean_over``: the inputs, replicated on every rank, are like the parameters there."""
    xs, t, cap, mask, upstream = batch
    xs = [x.clone().requires_grad_() for x in xs]
    cap = cap.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(xs, t, cap, mask)
    sum((o * u).sum() for o, u in zip(out, upstream)).backward()
    leaves = {f"x{i}": x for i, x in enumerate(xs)} | {"cap_feats": cap} | dict(model.named_parameters())
    grads = {}
    for name, leaf in leaves.items():
        g = leaf.grad.clone() if leaf.grad is not None else torch.zeros_like(leaf)
        if mean_over is not None:
            dist.all_reduce(g, group=mean_over)
            g /= dist.get_world_size(mean_over)
        grads[name] = g
    return torch.cat([o.flatten() for o in out]), grads


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return ((a.double() - b.double()).norm() / max(b.double().norm().item(), floor, 1e-30)).item()


def compare(group, strategy, heads, kv_heads, shapes, caption_lengths, variant="flag", checkpointing="none") -> dict:
    """The case run as one process without checkpointing, then over the group with ``checkpointing``."""
    import flagdit.parallel as fp
    import flagdit_kernels as fk

    model = _model(heads, kv_heads, variant)
    batch = _batch(shapes, caption_lengths)
    out, grads = _run(model, batch)
    model.checkpointing = checkpointing
    fp.parallelize(model, group, strategy)
    chosen = model.sequence_parallel.strategy
    out_sp, grads_sp = _run(model, batch, mean_over=group)
    fp.unparallelize(model)
    scale = torch.cat([g.flatten() for g in grads.values()]).norm().item()
    # A gradient that is zero in exact arithmetic (the text keys' LayerNorm bias: shifting every key of a
    # softmax changes nothing) is rounding noise in both runs: per parameter, errors are relative to the
    # larger of its own norm and 1e-3 of the whole gradient's.
    per_param = {n: _rel(grads_sp[n], g, 1e-3 * scale) for n, g in grads.items()}
    worst = max(per_param, key=per_param.get)
    return {
        "strategy": chosen,
        "tokens": sum(fk.pack(batch[0], 2, variant == "flag").seqlens),
        "out": _rel(out_sp, out),
        "grads": _rel(
            torch.cat([g.flatten() for g in grads_sp.values()]), torch.cat([g.flatten() for g in grads.values()])
        ),
        "worst_grad": per_param[worst],
        "worst_name": worst,
    }


def compare_saved_bytes(group, strategy: str) -> dict:
    """Saved bytes of one forward per rank over the group, against one process on the same batch."""
    import flagdit.parallel as fp

    model = _model(4, 4)
    batch = _batch(LONG, [3, 5])
    single = _saved_bytes(model, batch)
    fp.parallelize(model, group, strategy)
    spread = _saved_bytes(model, batch)
    fp.unparallelize(model)
    return {"single": single, "spread": spread, "ratio": spread / single}


def compare_sampling(group) -> dict:
    """flagdit.sample with sp_group equals one process, every rank from the group's first rank's noise."""
    import flagdit

    model = _model(4, 2)
    xs, _, cap, mask, _ = _batch(ODD, [3, 0, 5])
    shapes = [tuple(x.shape) for x in xs]
    kwargs = dict(steps=3, cfg_scale=3.0, shift=2.0)
    single = flagdit.sample(model, shapes, cap, mask, generator=torch.Generator().manual_seed(5), **kwargs)
    rank = dist.get_rank(group)  # each rank's own draw: only the first rank's may be used
    spread = flagdit.sample(model, shapes, cap, mask, generator=torch.Generator().manual_seed(5 + rank),
                            sp_group=group, sp_strategy="ring", **kwargs)  # fmt: skip
    restored = getattr(model, "sequence_parallel", None) is None
    flat = [torch.cat([x.flatten() for x in out]) for out in (spread, single)]
    return {"out": _rel(*flat), "grads": 0.0, "worst_grad": 0.0, "strategy": "ring", "restored": restored}


def expect_value_error(fn) -> dict:
    try:
        fn()
    except ValueError as e:
        outcome = {"raised": True, "message": str(e)}
    else:
        outcome = {"raised": False, "message": ""}
    dist.barrier()
    return outcome


def _bad_inputs(group, size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    import flagdit.parallel as fp

    world, rank = dist.get_world_size(), dist.get_rank(group)
    kv_misfit = (6, 3) if size == 2 else (12, 6)  # heads split, kv heads and the group do not divide each other
    results = {}
    one = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "sp"))
    results["group_of_one"] = expect_value_error(lambda: fp.parallelize(_model(4, 4), one))
    results["ulysses_heads"] = expect_value_error(lambda: fp.parallelize(_model(5, 5), group, "ulysses"))
    results["ulysses_kv_heads"] = expect_value_error(lambda: fp.parallelize(_model(*kv_misfit), group, "ulysses"))
    results["strategy_name"] = expect_value_error(lambda: fp.parallelize(_model(4, 4), group, "tensor"))
    results["sp_not_dividing_world"] = expect_value_error(lambda: fp.init_mesh(world - 1))
    two_d = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
    results["mesh_without_sp_dim"] = expect_value_error(lambda: fp.parallelize(_model(4, 4), two_d))

    def run(model, shapes, seed=1):
        xs, t, cap, mask, _ = _batch(shapes, [2] * len(shapes), seed)
        model(xs, t, cap, mask)

    model = fp.parallelize(_model(4, 4, "next"), group)
    # 2x2 pixels at patch size 2 and no [nextline]: one token, fewer than ranks
    results["too_few_tokens"] = expect_value_error(lambda: run(model, [(3, 2, 2)]))
    results["different_batches"] = expect_value_error(lambda: run(model, [(3, 4, 6 + 2 * rank)]))
    other = dist.new_group(list(range(world)))  # another group (every rank creates every group)
    results["other_group_in_context"] = expect_value_error(lambda: fp.sequence_parallel(model, other).__enter__())
    results["still_works_after"] = compare(group, "auto", 4, 4, [(3, 4, 6)], [2])
    return results


VIDEO = (3, 3, 4, 6)  # 3 frames of 2x3 patches: 3 * 2 * 4 + 2 = 26 tokens
ODD = [(3, 6, 10), VIDEO, (3, 2, 4)]  # 18 + 26 + 3 = 47 tokens: odd, sample boundaries inside rank runs
SHORT = [(3, 6, 10), (3, 2, 4), (3, 4, 6)]  # 18, 3 (fewer than 4: empty chunks) and 10 tokens
LONG = [(3, 16, 16), (3, 2, 8, 12)]  # 72 + 97 tokens: per-token memory outweighs the per-batch terms
# name -> (strategy, n_heads, n_kv_heads, latent shapes, caption lengths[, variant[, checkpointing]]), per group
# size
CASES = {
    2: {
        "ulysses_mha": ("ulysses", 4, 4, ODD, [3, 0, 5]),
        "ulysses_gqa_kv_ge_p": ("ulysses", 4, 2, ODD, [3, 1, 5]),
        "ulysses_gqa_kv_lt_p": ("ulysses", 4, 1, ODD, [2, 4, 1]),
        "ulysses_next_dit": ("ulysses", 4, 2, ODD, [3, 0, 5], "next"),
        "ring_gqa_kv_ge_p": ("ring", 4, 2, ODD, [3, 0, 5]),
        "ring_gqa_kv_lt_p": ("ring", 4, 1, ODD, [2, 4, 1]),
        "ring_all_captions_empty": ("ring", 4, 4, ODD, [0, 0, 0]),
        "ring_next_dit": ("ring", 4, 2, ODD, [3, 0, 5], "next"),
        "auto_odd_heads_is_ring": ("auto", 6, 3, ODD, [3, 2, 1]),
        "ring_block_checkpointing": ("ring", 4, 2, ODD, [3, 0, 5], "flag", "block"),
        "ulysses_selective_checkpointing": ("ulysses", 4, 2, ODD, [3, 0, 5], "next", "selective"),
    },
    4: {
        "ulysses_gqa_kv_lt_p": ("ulysses", 4, 2, ODD, [3, 0, 5]),
        "ulysses_gqa_kv_ge_p": ("ulysses", 8, 4, ODD, [3, 1, 5]),
        "ulysses_all_captions_empty": ("ulysses", 4, 1, ODD, [0, 0, 0]),
        "ring_gqa_kv_lt_p": ("ring", 4, 2, SHORT, [3, 0, 5]),
        "ring_gqa_kv_ge_p": ("ring", 8, 4, ODD, [2, 4, 1]),
        "auto_odd_heads_is_ring": ("auto", 6, 3, SHORT, [3, 2, 0], "next"),
        "ring_selective_checkpointing": ("ring", 4, 2, SHORT, [3, 0, 5], "next", "selective"),
        "ulysses_block_checkpointing": ("ulysses", 4, 2, ODD, [3, 1, 5], "flag", "block"),
    },
}


def checks() -> dict:
    """Every check for groups of 4 (the world) and of 2 (the "sp" dim of a 2 x 2 mesh: two groups side by side)."""
    import flagdit.parallel as fp

    results = {}
    for size, group in ((4, dist.group.WORLD), (2, fp.init_mesh(2)["sp"].get_group())):
        for name, case in CASES[size].items():
            try:
                results[f"sp{size}/{name}"] = compare(group, *case)
            except Exception:
                results[f"sp{size}/{name}"] = {"error": traceback.format_exc()}
        for strategy in ("ring", "ulysses"):
            try:
                results[f"sp{size}/{strategy}_saved_bytes"] = compare_saved_bytes(group, strategy)
            except Exception:
                results[f"sp{size}/{strategy}_saved_bytes"] = {"error": traceback.format_exc()}
        try:
            results[f"sp{size}/sampling"] = compare_sampling(group)
        except Exception:
            results[f"sp{size}/sampling"] = {"error": traceback.format_exc()}
        try:
            results.update({f"sp{size}/{k}": v for k, v in _bad_inputs(group, size).items()})
        except Exception:
            results[f"sp{size}/bad_inputs"] = {"error": traceback.format_exc()}
    return results


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = checks()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(WORLD, free_port(), sys.argv[1]), nprocs=WORLD)
