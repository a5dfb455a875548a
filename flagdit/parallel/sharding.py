"""Which packed tokens each rank of a sequence-parallel group holds, built once per batch from its layout.

Two ways to split the ``T`` tokens of a batch across ``P`` ranks:

- **contiguous** (Ulysses): rank r holds one run of the packed order, ``T // P`` tokens or one more; sample
  boundaries fall anywhere. After the all-to-all the ranks see the whole sequence in the original order, so
  attention runs with the batch's own offsets.
- **chunked** (ring): rank r holds the r-th run of *every* sample, ``ceil(L_b / P)`` rows of sample b on every
  rank, so that all ranks share one local layout and any rank's query block meets any other rank's key
  block under the same ``cu_seqlens`` (the kernel's one-offsets-for-q-and-k convention). Where ``L_b`` is not
  a multiple of P the ranks with fewer tokens of b fill the chunk's last row with a copy of the chunk's first
  token (of the sample's first token when they hold none); the ring attention removes the copy's key
  exactly, and its output is never gathered.

Either way the shard has: the global token of every local row (``rows``), the local layout as a
:class:`ShardedLayout` (offsets, per-token sample index and positions of the local rows: what every
token-local op needs), and the index that puts every rank's rows back into packed order (:meth:`gather`).
Every rank builds the same tables from the same host-side lengths; nothing is communicated except one small
all-gather that proves the ranks were given the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.distributed as dist

import flagdit_kernels as fk

from .collectives import all_gather_rows
from .mesh import SPGroup

CONTIGUOUS, CHUNKED = "contiguous", "chunked"


@dataclass(frozen=True)
class ShardedLayout(fk.VarlenLayout):
    """This rank's rows as a :class:`flagdit_kernels.VarlenLayout` (local offsets, one sequence per sample of
    the batch, possibly empty), carrying the :class:`TokenShard` they come from. Token-local ops use it as
    any layout; the sequence-parallel attention reads ``shard``."""

    shard: TokenShard | None = None


class TokenShard:
    """One rank's share of one packed batch (see the module docstring); built by :func:`shard_tokens`.

    A plain object, not a dataclass: its ``layout`` refers back to it, and wrappers that walk the dataclasses
    in a module's arguments (FSDP2 looks for tensors that need gradients) must not follow that loop.
    """

    def __init__(self, sp: SPGroup, kind: str, batch: fk.VarlenLayout, rows, rank_rows, gather_index):
        self.sp = sp
        self.kind = kind  # CONTIGUOUS or CHUNKED
        self.batch = batch  # the whole batch's layout (Ulysses attends over it)
        self.rows: torch.Tensor = rows  # int64 (N,): the global token of every local row
        self.rank_rows: list[int] = rank_rows  # rows held by each rank
        self.gather_index: torch.Tensor = gather_index  # int64 (T,): every token's row in the all-gathered rows
        self.layout: ShardedLayout | None = None  # the local rows' layout, once built
        # chunked: rows per sample on every rank, and per key block (origin rank) which samples' chunks hold a
        # copy (padded) or nothing but a copy (empty) there, as (P, B) tables and per origin as host flags
        self.chunk_rows: list[int] | None = None
        self.padded: torch.Tensor | None = None
        self.empty: torch.Tensor | None = None
        self.padded_any: list[bool] | None = None
        self.empty_any: list[bool] | None = None

    @property
    def num_rows(self) -> int:
        return self.rows.shape[0]

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a per-token tensor of the whole batch ``(T, ...)`` (no communication)."""
        if self.kind == CONTIGUOUS:
            start = sum(self.rank_rows[: self.sp.rank])
            return x.narrow(0, start, self.num_rows)
        return x.index_select(0, self.rows)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The whole batch ``(T, ...)`` on every rank from each rank's rows ``(N, ...)``; differentiable (each
        rank's rows get the sum of the group's gradients for them)."""
        longest = max(self.rank_rows)
        if x.shape[0] < longest:
            x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
        return all_gather_rows(x, self.sp.group).index_select(0, self.gather_index)


def balanced(n: int, parts: int) -> tuple[list[int], list[int]]:
    """(counts, starts) of ``n`` items split into ``parts`` runs, the first ``n % parts`` one longer."""
    q, r = divmod(n, parts)
    counts = [q + (i < r) for i in range(parts)]
    starts = [i * q + min(i, r) for i in range(parts)]
    return counts, starts


def _owner(i: torch.Tensor, n: int, parts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(part, start of that part) of every item index ``i`` under :func:`balanced`."""
    q, r = divmod(n, parts)
    long_items = r * (q + 1)
    part = torch.where(i < long_items, i // (q + 1), r + (i - long_items) // max(q, 1))
    return part, part * q + torch.minimum(part, torch.tensor(r))


def check_batch(
    sp: SPGroup, lengths: list[int], text_lengths: list[int], device: torch.device, model: dict[str, int] | None = None
) -> None:
    """Raises the same ``ValueError`` on every rank when the ranks were given batches of different layouts
    (token and caption counts per sample; the values are the caller's to keep equal, e.g. by one seed) or a
    batch that cannot be split; one all-gather of a few integers, which every rank reaches whatever its batch.
    ``model`` (:func:`~.apply.model_agreement`: heads, width, dtype, strategy as integers) travels in the same
    all-gather, so ranks that disagree about the model fail here, together, before any tensor of a
    rank-dependent shape is exchanged (which would abort or hang them)."""
    total = sum(lengths)
    weighted = sum((b + 1) * n for b, n in enumerate(lengths)) % (1 << 61)
    text_weighted = sum((b + 1) * n for b, n in enumerate(text_lengths)) % (1 << 61)
    names = list(model or {})
    values = [total, len(lengths), weighted, sum(text_lengths), text_weighted, *(model or {}).values()]
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    seen = [torch.empty_like(mine) for _ in range(sp.size)]
    dist.all_gather(seen, mine, group=sp.group)
    differ = [n for i, n in enumerate(names) if any(int(s[5 + i]) != int(seen[0][5 + i]) for s in seen)]
    if differ:
        summary = "; ".join(
            f"rank {r}: " + ", ".join(f"{n} {describe_value(n, int(s[5 + names.index(n)]))}" for n in differ)
            for r, s in enumerate(seen)
        )
        raise ValueError(f"the ranks of the sequence-parallel group disagree about the model ({summary})")
    if any(not torch.equal(s, seen[0]) for s in seen):
        summary = ", ".join(f"rank {i}: {int(s[0])} tokens in {int(s[1])} samples" for i, s in enumerate(seen))
        raise ValueError(f"the ranks of the sequence-parallel group were given different batches ({summary})")
    if total < sp.size:
        raise ValueError(
            f"num_tokens ({total}) cannot be split over the sequence-parallel group of {sp.size}: "
            "every rank needs at least one token"
        )


def describe_value(name: str, value: int) -> str:
    """A model-agreement integer as the words it stands for (dtype and strategy are table indices)."""
    if name == "dtype":
        return str(AGREED_DTYPES[value]).removeprefix("torch.") if 0 <= value < len(AGREED_DTYPES) else "other"
    if name == "strategy":
        return (CONTIGUOUS, CHUNKED)[value] if value in (0, 1) else "other"
    return str(value)


# The dtypes a model-agreement record names by index (any other dtype is one more code).
AGREED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def shard_tokens(
    batch: fk.VarlenLayout,
    lengths: list[int],
    sp: SPGroup,
    kind: str,
    text: fk.VarlenLayout | None = None,
    model: dict[str, int] | None = None,
) -> TokenShard:
    """This rank's :class:`TokenShard` of the packed batch ``batch`` whose samples have ``lengths`` tokens
    (host ints, e.g. ``Packed.seqlens``). ``text``: the captions' layout, and ``model``: what the ranks must
    agree about the model (:func:`check_batch`), both checked for agreement too."""
    if kind not in (CONTIGUOUS, CHUNKED):
        raise ValueError(f"kind must be {CONTIGUOUS!r} or {CHUNKED!r}, got {kind!r}")
    device = batch.cu_seqlens.device
    text_offsets = text.cu_seqlens.tolist() if text is not None else [0] * (len(lengths) + 1)
    check_batch(sp, lengths, [b - a for a, b in pairwise(text_offsets)], device, model)
    build = contiguous_shard if kind == CONTIGUOUS else chunked_shard
    shard, local_lengths = build(batch, lengths, sp)
    shard.rows, shard.gather_index = shard.rows.to(device), shard.gather_index.to(device)
    if kind == CHUNKED:
        shard.padded, shard.empty = shard.padded.to(device), shard.empty.to(device)
    cu = torch.tensor([0, *torch.tensor(local_lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    positions = batch.positions.index_select(0, shard.rows) if batch.positions is not None else None
    local = fk.VarlenLayout.from_cu_seqlens(cu.to(device), shard.num_rows, max(local_lengths, default=0), positions)
    shard.layout = ShardedLayout(local.cu_seqlens, local.max_seqlen, local.sample_index, local.positions, shard)
    return shard


def contiguous_shard(batch: fk.VarlenLayout, lengths: list[int], sp: SPGroup) -> tuple[TokenShard, list[int]]:
    """Rank ``sp.rank``'s contiguous shard (host tables, no local layout yet) and its rows per sample."""
    total = sum(lengths)
    counts, starts = balanced(total, sp.size)
    start, stop = starts[sp.rank], starts[sp.rank] + counts[sp.rank]
    local_lengths, offset = [], 0
    for n in lengths:
        local_lengths.append(max(0, min(offset + n, stop) - max(offset, start)))
        offset += n
    tokens = torch.arange(total)
    part, part_start = _owner(tokens, total, sp.size)
    gather_index = part * max(counts) + tokens - part_start
    shard = TokenShard(sp, CONTIGUOUS, batch, torch.arange(start, stop), counts, gather_index)
    return shard, local_lengths


def chunked_shard(batch: fk.VarlenLayout, lengths: list[int], sp: SPGroup) -> tuple[TokenShard, list[int]]:
    """Rank ``sp.rank``'s chunked shard (host tables, no local layout yet) and its rows per sample."""
    size, rank = sp.size, sp.rank
    chunk_rows = [-(-n // size) for n in lengths]
    rows_per_rank = sum(chunk_rows)
    rows, gather_index = [], []
    padded = torch.zeros(size, len(lengths), dtype=torch.bool)
    empty = torch.zeros(size, len(lengths), dtype=torch.bool)
    sample_start = local_start = 0
    for b, (n, c) in enumerate(zip(lengths, chunk_rows)):
        counts, starts = balanced(n, size)
        first = sample_start + starts[rank]
        rows.append(torch.arange(first, first + counts[rank]))
        if counts[rank] < c:  # a copy fills the chunk: of its first token, or of the sample's when it has none
            rows.append(torch.tensor([first if counts[rank] else sample_start]))
        for origin in range(size):
            padded[origin, b] = 0 < counts[origin] < c
            empty[origin, b] = counts[origin] == 0 < c
        index = torch.arange(n)
        part, part_start = _owner(index, n, size)
        gather_index.append(part * rows_per_rank + local_start + index - part_start)
        sample_start += n
        local_start += c
    shard = TokenShard(sp, CHUNKED, batch, torch.cat(rows), [rows_per_rank] * size, torch.cat(gather_index))
    shard.chunk_rows, shard.padded, shard.empty = chunk_rows, padded, empty
    shard.padded_any, shard.empty_any = padded.any(1).tolist(), empty.any(1).tolist()
    return shard, chunk_rows
