"""Which tokens each rank of a sequence-parallel group holds (flagdit.parallel.sharding), on the host alone:
every token is held exactly once (plus the chunked split's copies), the gather index puts the ranks' rows
back in packed order, and the chunked split gives every rank the same rows per sample."""

from __future__ import annotations

import pytest
import torch

import flagdit_kernels as fk
from flagdit.parallel.mesh import SPGroup
from flagdit.parallel.sharding import balanced, chunked_shard, contiguous_shard

CASES = [([7], 2), ([5, 1, 12], 2), ([3, 1, 9, 2], 4), ([1, 1, 1], 4), ([16, 8], 4), ([11, 6, 13], 3)]


def _layout(lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return fk.VarlenLayout.from_cu_seqlens(cu, sum(lengths))


def _shards(build, lengths, size):
    batch = _layout(lengths)
    return [build(batch, lengths, SPGroup(None, rank, size)) for rank in range(size)]


def _gathered(shards):
    """What gather() computes, without the collective: every rank's rows padded to the longest, in rank order."""
    longest = max(shards[0][0].rank_rows)
    parts = [torch.cat([s.rows, s.rows.new_full((longest - s.num_rows,), -1)]) for s, _ in shards]
    return torch.cat(parts)


def test_balanced_runs():
    assert balanced(7, 3) == ([3, 2, 2], [0, 3, 5])
    assert balanced(2, 4) == ([1, 1, 0, 0], [0, 1, 2, 2])


@pytest.mark.parametrize(("lengths", "size"), CASES)
def test_contiguous_shards_are_runs_of_the_packed_order(lengths, size):
    shards = _shards(contiguous_shard, lengths, size)
    total = sum(lengths)
    assert torch.equal(torch.cat([s.rows for s, _ in shards]), torch.arange(total))
    counts = [s.num_rows for s, _ in shards]
    assert max(counts) - min(counts) <= 1 and counts == shards[0][0].rank_rows
    assert torch.equal(_gathered(shards)[shards[0][0].gather_index], torch.arange(total))
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    for shard, local_lengths in shards:  # each rank's rows per sample: the overlap of its run with the sample
        assert torch.equal(torch.bincount(sample[shard.rows], minlength=len(lengths)), torch.tensor(local_lengths))


@pytest.mark.parametrize(("lengths", "size"), CASES)
def test_chunked_shards_hold_every_sample_in_equal_chunks(lengths, size):
    shards = _shards(chunked_shard, lengths, size)
    chunk = [-(-n // size) for n in lengths]
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    real = []
    for rank, (shard, local_lengths) in enumerate(shards):
        assert local_lengths == chunk and shard.num_rows == sum(chunk)
        row = 0
        for b, c in enumerate(chunk):
            counts, offsets = balanced(lengths[b], size)
            rows = shard.rows[row : row + c].tolist()
            first = starts[b] + offsets[rank]
            assert rows[: counts[rank]] == list(range(first, first + counts[rank]))
            if counts[rank] < c:  # the copy: the chunk's first token, or the sample's when the chunk has none
                assert rows[-1] == (first if counts[rank] else starts[b])
            assert bool(shard.padded[rank, b]) == (0 < counts[rank] < c)
            assert bool(shard.empty[rank, b]) == (counts[rank] == 0 < c)
            real += rows[: counts[rank]]
            row += c
        assert shard.padded_any == shard.padded.any(1).tolist()
    assert sorted(real) == list(range(sum(lengths)))  # every token held once, apart from the copies
    assert torch.equal(_gathered(shards)[shards[0][0].gather_index], torch.arange(sum(lengths)))
