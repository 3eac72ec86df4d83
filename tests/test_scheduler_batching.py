"""Continuous batching driven step by step on a tiny synthetic model (no gRPC): chunked prefill
keeps running streams flowing, prefill steps stay bounded, token step times, and a randomized mix
of everything keeps every stream correct."""

from __future__ import annotations

import pytest

from engine.sampling import SamplingParams
from engine.scheduler import FINISH_CANCELLED, FinishEvent, Request, TokenEvent
from scheduler_harness import greedy, make, outputs, run


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=1024)


def test_chunked_prefill_keeps_running_streams_flowing(path):
    sched, events = make(path, prefill_chunk=32)
    short = Request([5, 6, 7], greedy(200))
    sched.submit(short)
    for _ in range(3):
        sched.apply_commands()
        sched.step()
    long = Request(list(range(1, 300)) * 2, greedy(4))  # 598 tokens = 19 chunks of 32
    sched.submit(long)
    run(sched)
    order = [req is long for req, ev in events if isinstance(ev, TokenEvent)]
    first_long = order.index(True)
    short_before = first_long - 3  # short's tokens after the long one arrived
    assert short_before >= 598 // 32 - 1
    _, finals = outputs(events, [short, long])
    assert finals[1].stats.prefill_tokens == 598
    assert finals[0].stats.max_batch_size == 2


def test_an_idle_engine_prefills_a_long_prompt_in_bounded_steps(path):
    """A step is what a cancel or a deadline waits for at most: alone on the engine, a long
    prompt is prefilled prefill_budget_idle tokens per step, and a cancel between two of those
    steps ends it and frees its blocks."""
    sched, events = make(path)
    calls = []
    prefill = sched.model.prefill
    sched.model.prefill = lambda toks, table, start: calls.append((len(toks), start)) or prefill(toks, table, start)
    budget = sched.cfg.prefill_budget_idle
    long = Request(list(range(1, 300)) * 3, greedy(4))  # 897 tokens
    sched.submit(long)
    sched.apply_commands()
    sched.step()
    assert calls == [(budget, 0)]
    sched.cancel(long)
    run(sched)
    assert calls == [(budget, 0)]
    _, (final,) = outputs(events, [long])
    assert final.reason == FINISH_CANCELLED and sched.allocator.num_used == 0


def test_prefill_steps_shrink_as_attention_grows_deeper_into_a_prompt(path):
    """Each step of a long prompt's prefill holds about the same work: fewer tokens the deeper
    they sit (attention over all earlier positions), so no step is much longer than the first."""
    sched, events = make(path)
    calls = []
    prefill = sched.model.prefill
    sched.model.prefill = lambda toks, table, start: calls.append((len(toks), start)) or prefill(toks, table, start)
    long = Request(list(range(1, 300)) * 3, greedy(2))  # 897 tokens
    sched.submit(long)
    run(sched)
    sizes = [n for n, _ in calls]
    assert sum(sizes) == 897 and sizes[0] == sched.cfg.prefill_budget_idle
    assert all(n == min(897 - start, sched.chunk_at(start)) for n, start in calls)
    assert all(a >= b for a, b in zip(sizes, sizes[1:-1])) and sizes[1] < sizes[0]


def test_a_short_prompt_is_not_split_across_steps(path):
    """While others decode the prefill budget is small; the second prompt of a step that does not
    fit what is left of it waits for the next step instead of being cut in two."""
    sched, events = make(path, kv_blocks=64, prefill_chunk=32)
    calls = []
    prefill = sched.model.prefill
    sched.model.prefill = lambda toks, table, start: calls.append((len(toks), start)) or prefill(toks, table, start)
    running = Request([5, 6, 7], greedy(40))
    sched.submit(running)
    sched.apply_commands()
    sched.step()
    a, b = Request(list(range(10, 30)), greedy(3)), Request(list(range(40, 60)), greedy(3))
    sched.submit(a)
    sched.submit(b)
    run(sched)
    assert calls[1:] == [(20, 0), (20, 0)]  # each 20-token prompt whole, in its own step
    _, finals = outputs(events, [running, a, b])
    assert [f.stats.prefill_tokens for f in finals] == [3, 20, 20]


def test_a_burst_on_an_idle_engine_does_not_hold_the_first_stream(path):
    """Prompts arriving together at an idle engine: once the first has its first token, the step
    prefills at most ``prefill_chunk`` more tokens before that stream's second token (not every
    prompt of the burst), and every stream is still correct."""
    sched, events = make(path, prefill_chunk=32)
    prefill = sched.model.prefill
    sched.model.prefill = lambda toks, table, start: events.append(("prefill", len(toks))) or prefill(toks, table, start)
    reqs = [Request(list(range(10 + i, 30 + i)), greedy(6)) for i in range(6)]  # 6 x 20 tokens
    for r in reqs:
        sched.submit(r)
    run(sched)
    first = [k for k, (req, ev) in enumerate(events) if req is reqs[0] and isinstance(ev, TokenEvent)]
    between = sum(n for kind, n in events[first[0]:first[1]] if kind == "prefill")
    assert between <= 32
    got, finals = outputs([e for e in events if e[0] != "prefill"], reqs)
    for r, out in zip(reqs, got):
        alone, ev = make(path)
        ref = Request(list(r.prompt), greedy(6))
        alone.submit(ref)
        run(alone)
        assert out == outputs(ev, [ref])[0][0]
    assert all(f.stats.prefill_tokens == 20 for f in finals)


def test_step_time_of_a_token_is_the_engine_work_since_the_previous_one(path, monkeypatch):
    """engine_step_ns: a prompt's first token carries its prefill; its second only the decode
    (its own prefill came before its first token); a stream already decoding also carries the
    prefill that ran between its two tokens. Exact, on a clock that only model calls advance."""
    clock = [0]
    sched, events = make(path, clock=lambda: clock[0])
    prefill, decode = sched.model.prefill, sched.model.decode

    def slow_prefill(*a, **k):
        clock[0] += 100_000_000
        return prefill(*a, **k)

    def slow_decode(*a, **k):
        clock[0] += 10_000_000
        return decode(*a, **k)

    monkeypatch.setattr(sched.model, "prefill", slow_prefill)
    monkeypatch.setattr(sched.model, "decode", slow_decode)
    a = Request([5, 6, 7], greedy(6))
    sched.submit(a)
    for _ in range(3):
        sched.apply_commands()
        sched.step()
    b = Request([8, 9, 10], greedy(3))
    sched.submit(b)
    run(sched)
    steps = {id(r): [ev.step_ns for req, ev in events if req is r and isinstance(ev, TokenEvent)] for r in (a, b)}
    assert steps[id(b)] == [100_000_000, 10_000_000, 10_000_000]
    assert steps[id(a)][:2] == [100_000_000, 10_000_000]
    assert 110_000_000 in steps[id(a)][2:]  # the token after b's prefill
    assert sorted(steps[id(a)][2:]) == [10_000_000] * 3 + [110_000_000]


def test_randomized_mix_keeps_every_stream_correct_and_frees_everything(path):
    """A seeded mix under a small pool: prompts of every length (chunked, split, short), greedy and
    sampled, logprobs, stop ids, cancels at random steps, session turns, all arriving at random
    steps. Every request gets one final and no token after it; token counts match the usage;
    greedy requests that ran to their length equal the same request alone; nothing stays held."""
    import random

    rnd = random.Random(11)
    sched, events = make(path, kv_blocks=12, prefill_chunk=24)
    sessions = [sched.open_session(60) for _ in range(3)]
    plan = []  # (arrival step, request, cancel this many steps after submitting, or None)
    for i in range(40):
        prompt = [rnd.randrange(1, 250) for _ in range(rnd.choice([1, 3, 17, 40, 90]))]
        if rnd.random() < 0.5:
            params = greedy(rnd.choice([1, 5, 30, 60]))
        else:
            params = SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=rnd.choice([3, 20]),
                                    stop_token_ids=tuple(range(5, 60)), logprobs=rnd.choice([0, 2]))
        sess = sessions[i % 3] if rnd.random() < 0.2 else None
        cancel = rnd.randrange(0, 8) if sess is None and rnd.random() < 0.3 else None
        plan.append((rnd.randrange(0, 80), Request(prompt, params, session=sess), cancel))
    plan.sort(key=lambda x: x[0])
    all_reqs = [r for _, r, _ in plan]
    live_turn, cancels, step = {}, [], 0
    for _ in range(20000):  # bounded
        while plan and plan[0][0] <= step:
            _, r, cancel = plan[0]
            turn = live_turn.get(id(r.session))
            if turn is not None and not turn.done:
                break  # one turn at a time per session, as the server does
            plan.pop(0)
            sched.submit(r)
            if r.session is not None:
                live_turn[id(r.session)] = r
            if cancel is not None:
                cancels.append((step + cancel, r))
        for due in [c for c in cancels if c[0] <= step]:
            cancels.remove(due)
            sched.cancel(due[1])
        sched.apply_commands()
        if not plan and sched.idle():
            break
        sched.step()
        step += 1
    else:
        raise AssertionError("the mix did not finish")
    for sess in sessions:
        sched.close_session(sess)
    sched.apply_commands()
    assert sched.allocator.num_used == 0
    assert sched.num_prefilling == 0 and not sched.running and not sched.waiting

    tokens = {id(r): [] for r in all_reqs}
    finals = {}
    for req, ev in events:
        if isinstance(ev, TokenEvent):
            assert id(req) not in finals, "a token after the final"
            tokens[id(req)].append(ev)
            if req.params.logprobs:
                assert ev.logprob is not None and len(ev.top) == req.params.logprobs
        elif isinstance(ev, FinishEvent):
            assert id(req) not in finals, "two finals"
            finals[id(req)] = ev
    assert set(finals) == set(tokens)
    for r in all_reqs:
        f = finals[id(r)]
        assert f.stats.completion_tokens == len(tokens[id(r)])
        if f.reason == "length":
            assert len(tokens[id(r)]) == r.params.max_tokens
        if f.reason == "stop":
            assert tokens[id(r)][-1].token_id in (*r.params.stop_token_ids, sched.eos_id)
    # the seeded mix covers every way out and preemption
    assert {f.reason for f in finals.values()} >= {"length", "stop", FINISH_CANCELLED}
    assert sched.preemptions > 0

    solo, solo_events = make(path)
    checked = 0
    for r in all_reqs:
        if r.session is None and r.params.temperature == 0 and finals[id(r)].reason == "length":
            again = Request(list(r.prompt), r.params)
            solo.submit(again)
            run(solo)
            (alone,), _ = outputs(solo_events, [again])
            assert [e.token_id for e in tokens[id(r)]] == alone
            checked += 1
    assert checked >= 5
