"""Automatic prefix caching: full KV blocks shared by reference count across requests and
sessions, found by their exact token prefix, evicted LRU only when the pool needs them; outputs
equal the uncached run's token for token (greedy)."""

from __future__ import annotations

import collections

import pytest

from engine.kv_cache import ROOT, BlockAllocator, OutOfBlocks
from engine.scheduler import Request
from scheduler_harness import greedy, make, outputs, run

BS = 16  # the harness's block size


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=1024)


def check_pool(sched) -> None:
    """Every block's reference count is the number of live sequences holding it; a held block is
    neither free nor evictable (so nothing can hand it out again while a sequence reads it)."""
    alloc = sched.allocator
    live = list(sched.running) + list(sched.waiting)
    live += [s.seq for s in sched.sessions.values() if s.seq is not None and s.seq not in live]
    held = collections.Counter(b for seq in live for b in seq.blocks)
    for seq in live:
        assert len(set(seq.blocks)) == len(seq.blocks)
        assert list(seq.table[: len(seq.blocks)]) == seq.blocks
    assert all(alloc.refs(b) == n for b, n in held.items())
    assert alloc.num_used == len(held)
    assert not set(held) & (set(alloc._free) | set(alloc._evictable))


def drive(sched, max_steps=5000):
    """Like the harness's run, checking the pool's invariants after every step."""
    for _ in range(max_steps):
        sched.apply_commands()
        if sched.idle():
            check_pool(sched)
            return
        sched.step()
        check_pool(sched)
    raise AssertionError("scheduler did not finish")


def uncached(path, prompts, n):
    sched, events = make(path, kv_blocks=256, prefix_caching=False)  # a model of its own
    reqs = [Request(p, greedy(n)) for p in prompts]
    for r in reqs:
        sched.submit(r)
    run(sched)
    return outputs(events, reqs)[0]


# ------------------------------------------------------------------------- the allocator

def test_allocator_keeps_released_registered_blocks_findable_and_evicts_them_last_and_lru():
    alloc = BlockAllocator(4)
    a, b, c = alloc.allocate(3)
    pa = alloc.register(a, ROOT, (1, 2))
    pb = alloc.register(b, pa, (3, 4))
    assert alloc.register(c, ROOT, (1, 2)) == pa  # an equal block: c stays unregistered
    assert alloc.lookup(ROOT, (1, 2)) == (pa, a) and alloc.lookup(pa, (3, 4)) == (pb, b)
    assert alloc.lookup(ROOT, (3, 4)) is None  # the same tokens after another prefix
    alloc.free([b, a, c])  # a sequence's blocks, last first
    assert alloc.num_used == 0 and alloc.num_free == 4 and alloc.num_evictable == 2
    assert alloc.num_cached == 2
    alloc.acquire(a)  # a hit: in use again, not evictable
    assert alloc.refs(a) == 1 and alloc.num_evictable == 1
    # truly free blocks go first (c and the never used one), then the least recently released
    got = alloc.allocate(3)
    assert set(got[:2]) == {c, 3} and got[2] == b and alloc.evictions == 1
    assert alloc.lookup(pa, (3, 4)) is None and alloc.num_cached == 1
    with pytest.raises(OutOfBlocks):
        alloc.allocate(1)  # a is in use: never evicted
    alloc.free([a])
    with pytest.raises(ValueError, match=f"KV block {a} freed twice"):
        alloc.free([a])
    alloc.free(got)
    assert alloc.clear_cache() == 1 and alloc.num_cached == 0 and alloc.num_free == 4


# ------------------------------------------------------------------------- the scheduler

def test_a_stateless_turn_reuses_the_previous_turns_prefix_and_generates_the_same_tokens(path):
    """Turn N sends the whole conversation (prompt, answer, new message): the blocks turn N-1
    filled, its answer's included, are found again; the tokens equal an uncached run's."""
    first = list(range(3, 53))                        # 50 prompt tokens
    sched, events = make(path)
    t1 = Request(first, greedy(20))
    sched.submit(t1)
    drive(sched)
    (answer,), _ = outputs(events, [t1])
    second = first + answer + list(range(100, 110))   # 80 tokens
    t2 = Request(second, greedy(20))
    sched.submit(t2)
    drive(sched)
    got, (f1, f2) = outputs(events, [t1, t2])
    assert f1.stats.cached_tokens == 0
    # turn 1 left 69 tokens of KV (its last token is sampled, never fed): 4 full blocks
    assert f2.stats.cached_tokens == 4 * BS
    assert f2.stats.prefill_tokens == len(second) - 4 * BS
    assert sched.allocator.num_used == 0 and sched.allocator.num_cached > 0
    assert got == uncached(path, [first, second], 20)


def test_the_last_prompt_token_is_always_computed(path):
    """A prompt of whole blocks equal to a cached one still prefills its last block (its last
    token's logits give the first token)."""
    prompt = list(range(5, 5 + 3 * BS))
    sched, events = make(path)
    reqs = [Request(prompt, greedy(4)), Request(prompt, greedy(4))]
    for r in reqs:
        sched.submit(r)
        drive(sched)
    got, finals = outputs(events, reqs)
    assert [f.stats.cached_tokens for f in finals] == [0, 2 * BS]
    assert finals[1].stats.prefill_tokens == BS
    assert got[0] == got[1]


def test_concurrent_requests_share_their_common_prefix_blocks(path):
    """Two requests with the same 40-token prefix submitted together: the second is admitted
    after the first's prefill in the same step and holds the first's two full blocks too."""
    common = list(range(7, 47))
    prompts = [common + [200, 201, 202], common + [210, 211]]
    sched, events = make(path)
    reqs = [Request(p, greedy(12)) for p in prompts]
    for r in reqs:
        sched.submit(r)
    sched.apply_commands()
    sched.step()
    check_pool(sched)
    a, b = (r.seq for r in reqs)
    assert a.blocks[:2] == b.blocks[:2] and a.blocks[2] != b.blocks[2]
    assert all(sched.allocator.refs(x) == 2 for x in a.blocks[:2])
    drive(sched)
    got, finals = outputs(events, reqs)
    assert [f.stats.cached_tokens for f in finals] == [0, 2 * BS]
    assert sched.allocator.num_used == 0
    assert got == uncached(path, prompts, 12)


def test_switch_off_means_no_hits_and_nothing_cached(path):
    prompt = list(range(9, 60))
    sched, events = make(path, prefix_caching=False)
    reqs = [Request(prompt, greedy(5)), Request(prompt, greedy(5))]
    for r in reqs:
        sched.submit(r)
        drive(sched)
    _, finals = outputs(events, reqs)
    assert [f.stats.cached_tokens for f in finals] == [0, 0]
    assert sched.allocator.num_cached == 0 and sched.allocator.num_evictable == 0


def test_sessions_register_their_blocks_and_hit_what_others_cached(path):
    """A session's conversation is found by a stateless request and by a new session; a
    session's first turn finds what a stateless request left."""
    sched, events = make(path)
    s1 = sched.open_session(60)
    t1 = Request(list(range(1, 41)), greedy(10), session=s1)
    sched.submit(t1)
    drive(sched)
    conversation = s1.tokens  # 50 tokens, 49 of them in the KV cache: 3 full blocks
    g = Request(conversation + [300, 301], greedy(6))
    s2 = sched.open_session(60)
    t2 = Request(conversation[:45], greedy(6), session=s2)
    for r in (g, t2):
        sched.submit(r)
        drive(sched)
    _, finals = outputs(events, [t1, g, t2])
    assert [f.stats.cached_tokens for f in finals] == [0, 3 * BS, 2 * BS]
    assert finals[1].stats.prefill_tokens == len(conversation) + 2 - 3 * BS
    for s in (s1, s2):
        sched.close_session(s)
    sched.apply_commands()
    assert sched.allocator.num_used == 0 and sched.allocator.num_cached > 0


def test_a_session_truncating_into_a_shared_block_recomputes_it_and_never_writes_it(path):
    """Replacing the conversation within a full block that another sequence holds too: the
    session gives that block up (its tokens are recomputed) instead of overwriting what the
    other reads; a block it alone holds it keeps (and no longer offers)."""
    sched, events = make(path)
    sess = sched.open_session(60)
    t1 = Request(list(range(1, 41)), greedy(10), session=sess)
    sched.submit(t1)
    drive(sched)
    conversation = sess.tokens
    reader = Request(conversation[:36] + [250], greedy(30))  # shares blocks 0 and 1
    sched.submit(reader)
    sched.apply_commands()
    sched.step()
    assert reader.seq.blocks[:2] == sess.seq.blocks[:2]
    shared = sess.seq.blocks[1]
    t2 = Request(conversation[:20] + [99, 98], greedy(3), session=sess, replace=True)
    sched.submit(t2)
    drive(sched)
    _, (f2,) = outputs(events, [t2])
    assert f2.stats.cached_tokens == BS  # 20 in common, but block 1 is shared: only block 0 kept
    assert sess.seq.blocks[1] != shared
    got, _ = outputs(events, [reader])
    assert got == uncached(path, [conversation[:36] + [250]], 30)
    # now block 1 is the session's alone: a replacing turn within it keeps and rewrites it
    own = sess.seq.blocks[1]
    t3 = Request(sess.tokens[:20] + [97], greedy(2), session=sess, replace=True)
    sched.submit(t3)
    drive(sched)
    _, (f3,) = outputs(events, [t3])
    assert f3.stats.cached_tokens == 20 and sess.seq.blocks[1] == own
    sched.close_session(sess)
    sched.apply_commands()
    assert sched.allocator.num_used == 0


def test_eviction_under_pressure_never_takes_a_running_sequences_blocks(path):
    """A small pool, a long-running sequence whose prompt blocks are cached, and a stream of
    other requests: cached blocks are evicted LRU, the running ones never; the pool returns to
    no blocks in use, and outputs equal the uncached run's."""
    long = list(range(2, 60))
    others = [[40 + i] * 3 + list(range(100 + 7 * i, 140 + 7 * i)) for i in range(8)]
    sched, events = make(path, kv_blocks=14)
    reqs = [Request(long, greedy(100))]
    sched.submit(reqs[0])
    for p in others:
        r = Request(p, greedy(8))
        reqs.append(r)
        sched.submit(r)
        for _ in range(6):  # a few steps between arrivals
            sched.apply_commands()
            sched.step()
            check_pool(sched)
    drive(sched)
    got, finals = outputs(events, reqs)
    assert all(f.reason == "length" for f in finals)
    alloc = sched.allocator
    assert alloc.evictions > 0
    assert alloc.num_used == 0 and alloc.num_evictable <= alloc.num_blocks
    assert got == uncached(path, [long] + others, 100)[:1] + uncached(path, others, 8)
    alloc.clear_cache()
    assert alloc.num_free == alloc.num_blocks


def test_preemption_with_prefix_caching_recomputes_from_the_cache(path):
    """Sequences sharing a prefix in a pool too small for all: preempted ones release their
    references and, recomputing, find their prefix again; outputs equal the uncached run's."""
    common = list(range(11, 43))  # two full blocks
    prompts = [common + [60 + i, 70 + i, 80] for i in range(4)]
    sched, events = make(path, kv_blocks=10)
    reqs = [Request(p, greedy(70)) for p in prompts]
    for r in reqs:
        sched.submit(r)
    drive(sched)
    got, finals = outputs(events, reqs)
    assert sched.preemptions > 0
    assert all(f.reason == "length" for f in finals)
    assert sum(f.stats.cached_tokens for f in finals) >= 3 * 2 * BS
    assert sched.allocator.num_used == 0
    assert got == uncached(path, prompts, 70)
