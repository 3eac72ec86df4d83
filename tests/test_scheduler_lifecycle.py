"""The scheduler's front and its engine thread: cancel and deadlines free blocks, the bounded
waiting queue, finished requests logged, and start/stop owning the thread."""

from __future__ import annotations

import threading
import time

import pytest

from engine.scheduler import FINISH_CANCELLED, FINISH_DEADLINE, FinishEvent, QueueFull, Request
from scheduler_harness import greedy, make, outputs, run


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=1024)


def test_cancel_frees_blocks_within_one_step(path):
    sched, events = make(path)
    r = Request([1, 2, 3], greedy(500))
    sched.submit(r)
    for _ in range(40):
        sched.apply_commands()
        sched.step()
    assert sched.allocator.num_used > 0
    sched.cancel(r)
    sched.apply_commands()
    assert sched.allocator.num_used == 0 and not sched.running
    assert isinstance(events[-1][1], FinishEvent) and events[-1][1].reason == FINISH_CANCELLED


def test_deadline_finishes_and_frees(path):
    sched, events = make(path)
    r = Request([1, 2, 3], greedy(900), deadline_ns=time.monotonic_ns() + 20_000_000)
    sched.submit(r)
    run(sched)
    _, (final,) = outputs(events, [r])
    assert final.reason == FINISH_DEADLINE
    assert final.stats.completion_tokens < 900
    assert sched.allocator.num_used == 0


def test_finished_requests_are_logged_with_their_request_id(path, caplog):
    sched, _ = make(path)
    with caplog.at_level("DEBUG", logger="engine.scheduler"):
        sched.submit(Request([1, 2, 3], greedy(2), request_id="order-66"))
        run(sched)
    assert "request 'order-66' (sequence" in caplog.text and "finished: length" in caplog.text


def test_bounded_waiting_queue(path):
    """Up to max_waiting requests wait beyond those the batch has room for: a burst on an idle
    engine is not refused before the engine has admitted any of it."""
    sched, _ = make(path, max_waiting=3)  # max_batch=16
    for i in range(16 + 3):
        sched.submit(Request([1, 2], greedy(4)))
    with pytest.raises(QueueFull, match="3 requests waiting, limit max_waiting=3"):
        sched.submit(Request([1, 2], greedy(4)))
    sched.apply_commands()  # in the waiting queue, not yet scheduled: still counted
    with pytest.raises(QueueFull, match="max_waiting=3"):
        sched.submit(Request([1, 2], greedy(4)))
    run(sched)
    sched.submit(Request([1, 2], greedy(4)))  # room again once admitted


def test_a_token_id_outside_the_vocabulary_is_refused_at_submit(path):
    sched, _ = make(path)
    vocab = sched.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"prompt token id {bad} is outside the vocabulary \[0, {vocab}\)"):
            sched.submit(Request([1, bad, 2], greedy(4)))
    assert sched.num_waiting == 0


def _wait_final(events, req, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r is req and isinstance(ev, FinishEvent) for r, ev in list(events)):
            return
        time.sleep(0.01)
    raise AssertionError("no final within the timeout")


def test_start_owns_the_engine_thread_and_stop_joins_it(path):
    """start() runs the loop on its own thread: a submitted request streams the same tokens as
    when stepped by hand; stop() ends the loop and joins the thread; a stopped scheduler stays
    stopped."""
    alone, ev_alone = make(path)
    ref = Request([4, 5, 6], greedy(7))
    alone.submit(ref)
    run(alone)
    (expected,), _ = outputs(ev_alone, [ref])

    sched, events = make(path)
    sched.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            sched.start()
        r = Request([4, 5, 6], greedy(7))
        sched.submit(r)
        _wait_final(events, r)
    finally:
        assert sched.stop(timeout=30)
    assert not [t for t in threading.enumerate() if t.name == "wafer-engine"]
    (got,), (final,) = outputs(events, [r])
    assert got == expected and final.reason == "length"
    assert sched.allocator.num_used == 0 and sched.idle()
    assert sched.stop() is True  # idempotent
    assert sched.start() is None  # stopped stays stopped: no thread
    assert not [t for t in threading.enumerate() if t.name == "wafer-engine"]


def test_start_runs_the_per_thread_setup_on_the_engine_thread_it_returns(path):
    import numba

    sched, events = make(path)
    seen = {}

    def setup():  # Numba's thread count is per thread: a server sets it on the engine thread
        numba.set_num_threads(1)
        seen["thread"] = threading.current_thread()

    thread = sched.start(name="wafer-engine-tiny", on_thread=setup)
    try:
        r = Request([4, 5, 6], greedy(3))
        sched.submit(r)
        _wait_final(events, r)
    finally:
        assert sched.stop(timeout=30)
    assert seen["thread"] is thread and thread.name == "wafer-engine-tiny" and not thread.is_alive()
    assert thread is not threading.current_thread()


def test_stop_joins_a_loop_run_on_the_callers_own_thread(path):
    sched, events = make(path)
    thread = threading.Thread(target=sched.run, name="owner")
    thread.start()
    r = Request([7, 8], greedy(3))
    sched.submit(r)
    _wait_final(events, r)
    assert sched.stop(timeout=30) and not thread.is_alive()


def test_stop_before_the_loop_starts_keeps_it_from_running(path):
    sched, _ = make(path)
    sched.stop()
    sched.run()  # returns at once
    sched.start()
    assert not [t for t in threading.enumerate() if t.name == "wafer-engine"]


def test_draining_refuses_new_work_and_finish_all_ends_every_stream(path):
    from engine.scheduler import FINISH_SHUTDOWN, SchedulerClosed

    sched, events = make(path)
    sess = sched.open_session(60)
    reqs = [Request([1, 2, 3], greedy(300)), Request([4, 5], greedy(300), session=sess)]
    for r in reqs:
        sched.submit(r)
    for _ in range(3):
        sched.apply_commands()
        sched.step()
    sched.stop_accepting()
    with pytest.raises(SchedulerClosed, match="shutting down"):
        sched.submit(Request([1], greedy(1)))
    with pytest.raises(SchedulerClosed, match="shutting down"):
        sched.open_session(60)
    sched.finish_all()
    run(sched)
    _, finals = outputs(events, reqs)
    assert [f.reason for f in finals] == [FINISH_SHUTDOWN, FINISH_SHUTDOWN]
    assert sched.allocator.num_used == 0 and not sched.sessions
