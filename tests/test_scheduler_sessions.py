"""Sessions on the scheduler: a session keeps its KV between turns, an idle session's cache
gives way when the pool is needed, closing frees everything."""

from __future__ import annotations

import pytest

from engine.scheduler import Request
from scheduler_harness import greedy, make, outputs, run


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=1024)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_idle_session_cache_is_evicted_when_the_pool_is_needed(path, prefix_caching):
    sched, events = make(path, kv_blocks=8, prefix_caching=prefix_caching)
    sess = sched.open_session(60)
    t1 = Request(list(range(1, 80)), greedy(10), session=sess)
    sched.submit(t1)
    run(sched)
    held = sched.allocator.num_used
    assert held == 6  # the idle session keeps 89 tokens of KV
    other = Request(list(range(1, 60)), greedy(30))  # needs 6 blocks: only 2 free
    sched.submit(other)
    run(sched)
    _, (f,) = outputs(events, [other])
    assert f.reason == "length" and sched.allocator.num_used == 0
    # the session still works: its next turn recomputes what was dropped (with prefix caching,
    # what the pool did not need since is found again: the dropped blocks stayed cached)
    t2 = Request([7, 8, 9], greedy(5), session=sess)
    sched.submit(t2)
    run(sched)
    _, (f2,) = outputs(events, [t2])
    assert f2.reason == "length" and (f2.stats.cached_tokens > 0) == prefix_caching
    assert f2.stats.prefill_tokens == f2.stats.prompt_tokens - f2.stats.cached_tokens
    assert f2.stats.prompt_tokens == 79 + 10 + 3


def test_a_session_turn_prefills_only_what_its_cache_lacks(path):
    """An appended turn reuses the whole cached conversation; a replacing turn the prefix it
    shares with it; closing the session frees its blocks."""
    sched, events = make(path)
    sess = sched.open_session(60)
    t1 = Request(list(range(1, 40)), greedy(5), session=sess)
    sched.submit(t1)
    run(sched)
    t2 = Request([7, 8, 9], greedy(4), session=sess)
    sched.submit(t2)
    run(sched)
    conversation = sess.tokens
    assert len(conversation) == 39 + 5 + 3 + 4
    t3 = Request(conversation[:20] + [99, 98], greedy(2), session=sess, replace=True)
    sched.submit(t3)
    run(sched)
    _, finals = outputs(events, [t1, t2, t3])
    assert [f.stats.cached_tokens for f in finals] == [0, 39 + 4, 20]
    assert [f.stats.prefill_tokens for f in finals] == [39, 1 + 3, 2]
    assert sched.allocator.num_used > 0
    sched.close_session(sess)
    sched.apply_commands()
    assert sched.allocator.num_used == 0 and not sched.sessions
