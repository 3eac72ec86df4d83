"""Admission by predicted wait (engine.scheduler.admission): the estimate from queued prefill
tokens and the measured rates (forced here: behaviour, not timing), refusal beyond max_queue_ms
or the call's remaining deadline, and the running sums back to 0 when the engine is idle."""

from __future__ import annotations

import time

import pytest

from engine.sampling import SamplingParams
from engine.scheduler import FINISH_CANCELLED, Overloaded, QueueFull, Request
from scheduler_harness import greedy, make, outputs, run


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=1024)


@pytest.fixture(autouse=True)
def pool_left_empty(path):
    """The harness shares one model per file among the scheduler tests: leave its pool empty."""
    yield
    import scheduler_harness

    model = scheduler_harness._shared.get(path)
    assert model is None or model.kv.allocator.num_used == 0

def req(n_prompt=100, n_out=4, **kw):
    return Request([1 + i % 300 for i in range(n_prompt)], greedy(n_out), **kw)  # ids < the vocab of 320


def test_nothing_is_refused_before_the_rates_are_measured(path):
    sched, _ = make(path, max_queue_ms=1)
    for _ in range(20):
        sched.submit(req(200))
    assert sched.estimated_queue_wait().wait_s == 0.0
    run(sched)


def test_estimate_grows_with_queued_prefill_tokens_and_refuses_beyond_max_queue_ms(path):
    sched, _ = make(path, max_queue_ms=1000, prefill_chunk=64)
    sched.admission.force(prefill_tok_s=1000.0)  # 1 ms per token, no decode interleaving
    for _ in range(5):
        sched.submit(req(200))  # 5 x 200 tokens ahead: 1.0 s
    est = sched.estimated_queue_wait()
    assert est.tokens_ahead == 1000 and est.requests_ahead == 5
    assert est.wait_ms == pytest.approx(1000.0)
    sched.submit(req(200))  # 1000 ms is not beyond the bound
    with pytest.raises(Overloaded, match=r"estimated queue wait 1200 ms exceeds max_queue_ms=1000 "
                                         r"\(1200 prompt tokens ahead at 1000 tok/s, 6 requests queued"):
        sched.submit(req(10))
    assert sched.admission.refused == 1
    assert issubclass(Overloaded, QueueFull)  # the server's RESOURCE_EXHAUSTED
    sched.apply_commands()  # the engine takes them: the charges become its own count
    assert sched.estimated_queue_wait().tokens_ahead == 1200
    run(sched)
    assert sched.estimated_queue_wait().tokens_ahead == 0
    sched.submit(req(200))  # the queue is empty again
    run(sched)


def test_decode_steps_interleaved_with_the_prefill_count(path):
    sched, _ = make(path, max_queue_ms=10_000, prefill_chunk=64)
    sched.admission.force(prefill_tok_s=1000.0, decode_step_s=0.010)
    for _ in range(2):
        sched.submit(req(128))
    est = sched.estimated_queue_wait()
    assert est.prefill_s == pytest.approx(0.256)
    assert est.interleave_s == pytest.approx(4 * 0.010)  # 256 tokens in chunks of 64
    run(sched)


def test_a_full_batch_adds_the_wait_for_free_slots(path):
    """max_batch=16 running sequences; the 3rd request queued beyond them waits for 3 to finish,
    at 16 per (mean completion tokens x step time)."""
    sched, _ = make(path, max_queue_ms=10_000)
    sched.admission.force(prefill_tok_s=1e9, decode_step_s=0.01, step_s=0.02, completion_tokens=80)
    for _ in range(16):
        sched.submit(req(4, n_out=500))
    sched.apply_commands()
    for _ in range(3):
        sched.step()
    assert sched.num_running == 16
    for _ in range(2):
        sched.submit(req(4))
    est = sched.estimated_queue_wait()
    assert est.slot_s == pytest.approx(3 * 80 * 0.02 / 16)
    assert est.wait_s == pytest.approx(est.slot_s)
    for r in [s.req for s in sched.running]:
        sched.cancel(r)
    run(sched)
    assert sched.estimated_queue_wait().wait_s == 0.0


def test_a_deadline_shorter_than_the_estimated_wait_is_refused_at_once(path):
    """Within a generous max_queue_ms, the call's own deadline bounds its queue wait."""
    sched, events = make(path, max_queue_ms=60_000)
    sched.admission.force(prefill_tok_s=1000.0)
    # an idle engine: nothing ahead, so even a 1 ms deadline is admitted (it may still expire)
    sched.submit(req(100, deadline_ns=time.monotonic_ns() + 1_000_000))
    now = time.monotonic_ns()
    sched.submit(req(300, deadline_ns=now + 10 * 10**9))  # 100 ahead: 0.1 s < 10 s
    with pytest.raises(Overloaded, match=r"estimated queue wait 400 ms exceeds the call's remaining "
                                         r"deadline of (29\d|300) ms"):
        sched.submit(req(10, deadline_ns=time.monotonic_ns() + 300_000_000))
    sched.submit(req(10))  # no deadline: admitted
    run(sched)
    assert sched.allocator.num_used == 0


def test_without_max_queue_ms_nothing_is_refused_for_its_wait(path):
    sched, _ = make(path)
    sched.admission.force(prefill_tok_s=10.0)
    for _ in range(5):
        sched.submit(req(100, deadline_ns=time.monotonic_ns() + 1_000_000))
    assert sched.estimated_queue_wait().wait_s > 1
    run(sched)


def test_cancelled_and_preempted_work_leaves_the_sums_balanced(path):
    sched, events = make(path, max_queue_ms=10_000)
    sched.admission.force(prefill_tok_s=1000.0)
    a, b = req(300, n_out=50), req(300)
    sched.submit(a)
    sched.submit(b)
    sched.cancel(b)  # cancelled while still in the inbox
    sched.apply_commands()
    assert sched.estimated_queue_wait().tokens_ahead == 300
    sched.cancel(a)  # cancelled while waiting
    sched.apply_commands()
    assert sched.estimated_queue_wait().tokens_ahead == 0
    _, finals = outputs(events, [a, b])
    assert [f.reason for f in finals] == [FINISH_CANCELLED, FINISH_CANCELLED]
    # a chunked prefill cancelled half-way
    c = req(900, n_out=5)
    sched.submit(c)
    sched.apply_commands()
    sched.step()
    left = sched.estimated_queue_wait().tokens_ahead
    assert 0 < left < 900
    sched.cancel(c)
    sched.apply_commands()
    assert sched.estimated_queue_wait().tokens_ahead == 0


def test_preemption_requeues_its_recompute(path):
    """A KV pool of 8 blocks x 16: two sequences growing past it; the newest is preempted and
    its recompute counts as tokens ahead until it is prefilled again."""
    sched, events = make(path, kv_blocks=8, max_queue_ms=60_000)
    sched.admission.force(prefill_tok_s=1000.0)
    reqs = [Request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
            for _ in range(2)]
    for r in reqs:
        sched.submit(r)
    seen = 0
    for _ in range(500):
        sched.apply_commands()
        if sched.idle():
            break
        sched.step()
        seen = max(seen, sched.estimated_queue_wait().tokens_ahead)
    assert sched.preemptions >= 1 and seen > 0
    assert sched.estimated_queue_wait().tokens_ahead == 0


def test_measured_rates_come_from_the_engine_steps(path):
    sched, _ = make(path)
    for _ in range(4):
        sched.submit(req(64, n_out=8))
    run(sched)
    adm = sched.admission
    assert adm.prefill_tok_s > 0 and adm.decode_step_s > 0 and adm.step_s >= adm.decode_step_s
    assert adm.completion_tokens == pytest.approx(8)


def test_session_turns_are_charged_what_they_prefill(path):
    """A session turn reuses its cached prefix: once applied, only its new tokens count."""
    sched, _ = make(path, max_queue_ms=60_000)
    sched.admission.force(prefill_tok_s=1000.0)
    s = sched.open_session()
    sched.submit(Request(list(range(1, 201)), greedy(3), session=s))
    run(sched)
    sched.submit(Request(list(range(1, 11)), greedy(3), session=s))  # appended: 10 new tokens
    sched.apply_commands()
    assert sched.estimated_queue_wait().tokens_ahead in (10, 11)  # (+ the last reply token)
    run(sched)
    assert sched.estimated_queue_wait().tokens_ahead == 0
    sched.close_session(s)
    sched.apply_commands()
