"""KV block ownership under the scheduler: the allocator, each decode row's block table as
sequences grow and rows move, and preemption under a small pool never corrupting a stream."""

from __future__ import annotations

import pytest

from engine.kv_cache import BlockAllocator, OutOfBlocks
from engine.scheduler import Request
from scheduler_harness import greedy, make, outputs, run


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=1024)


def test_block_allocator_hands_out_distinct_blocks_and_refuses_a_double_free():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(1), alloc.allocate(2)
    assert len(set(a + b)) == 3 and alloc.num_used == 3
    with pytest.raises(OutOfBlocks, match="asked for 2 KV blocks, 1 of 4 free"):
        alloc.allocate(2)
    alloc.free(b)
    with pytest.raises(ValueError, match=f"KV block {b[0]} freed twice"):
        alloc.free(b[:1])
    assert sorted(alloc.allocate(3)) == sorted(set(range(4)) - set(a))


def test_decode_rows_get_each_new_block_in_their_table(path):
    """Decode grows a sequence one block at a time and writes only the new entries into its
    batch row; the row must match the sequence's own table every step, also after rows move."""
    sched, events = make(path)
    reqs = [Request(prompt=list(range(3, 3 + n)), params=greedy(40)) for n in (5, 14, 16, 30)]
    for r in reqs:
        sched.submit(r)
    for _ in range(200):
        sched.apply_commands()
        if not sched.running and not sched.waiting:
            break
        sched.step()
        for i, seq in enumerate(sched.batch.seqs):
            assert seq.row == i
            assert list(sched.batch.tables[i, : len(seq.blocks)]) == seq.blocks == list(seq.table[: len(seq.blocks)])
        if reqs[1].seq is not None and reqs[1].seq.n_tokens == 30:
            sched.cancel(reqs[1])  # a row leaves: the last row moves into its place
    assert sched.allocator.num_used == 0


def test_preemption_under_a_small_pool_keeps_streams_correct(path):
    prompts = [[1 + i, 20 + i, 30, 40 + 2 * i, 50] for i in range(4)]
    big, ev_big = make(path)
    reqs = [Request(p, greedy(70)) for p in prompts]
    for r in reqs:
        big.submit(r)
    run(big)
    expected, _ = outputs(ev_big, reqs)

    # 4 sequences x 75 tokens need 20 blocks of 16; the pool has 10
    small, ev_small = make(path, kv_blocks=10)
    reqs = [Request(p, greedy(70)) for p in prompts]
    for r in reqs:
        small.submit(r)
    run(small)
    got, finals = outputs(ev_small, reqs)
    assert small.preemptions > 0
    assert sum(f.stats.preemptions for f in finals) == small.preemptions
    assert all(f.reason == "length" for f in finals)
    assert got == expected
    assert small.allocator.num_used == 0
