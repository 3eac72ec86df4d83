"""The gRPC server on loopback with a tiny synthetic model, Session calls: KV reuse across turns,
cancel and close, turns queued in order, idle expiry, refused turns, deadlines, and their metrics."""

from __future__ import annotations

import time

import grpc
import pytest

from engine.client import Completion, SessionError, Token, WaferClient
from protos import wafer_pb2 as pb
from serving import CONTEXT, client, kv_used, model_path, scrape, server, session_script, split, turn, wait_until  # noqa: F401 (fixtures)

def test_session_reuses_kv_and_matches_fresh_request(client, server):
    first = [{"role": "user", "content": "tell me about the sea"}]
    with client.session() as s:
        reply1, done1 = s.say(first[0]["content"], max_tokens=12, temperature=0)
        assert done1.usage["cached_tokens"] == 0
        reply2, done2 = s.say("and the sky", max_tokens=12, temperature=0)
        u = done2.usage
        assert u["cached_tokens"] > done1.usage["prompt_tokens"] // 2
        assert u["prefill_tokens"] == u["prompt_tokens"] - u["cached_tokens"]
        assert u["prefill_tokens"] < done1.usage["prompt_tokens"]
        assert kv_used(server) > 0  # the session keeps its blocks between turns
    conversation = first + [{"role": "assistant", "content": reply1},
                            {"role": "user", "content": "and the sky"}]
    fresh_text, fresh = client.complete(messages=conversation, max_tokens=12, temperature=0)
    assert fresh.usage["prompt_tokens"] == u["prompt_tokens"]
    assert fresh_text == reply2
    assert wait_until(lambda: kv_used(server) == 0)  # closing the session freed them


def test_session_token_turns_prefill_only_new_tokens(client, server):
    tok = server.runtime().tokenizer
    a, b = tok.encode("one two three"), tok.encode(" four five")
    with client.session() as s:
        out1 = [t.id for t in s.turn(token_ids=a, max_tokens=8, temperature=0) if isinstance(t, Token)]
        items = list(s.turn(token_ids=b, max_tokens=8, temperature=0))
        out2 = [t.id for t in items if isinstance(t, Token)]
        u = items[-1].usage
    history = a + out1
    # the sequence holds a + out1; the last sampled token was never fed, so it is prefilled too
    assert u["cached_tokens"] == len(history) - 1
    assert u["prefill_tokens"] == len(b) + 1
    fresh = [t.id for t in client.generate(token_ids=history + b, max_tokens=8, temperature=0)
             if isinstance(t, Token)]
    assert out2 == fresh


def test_session_cancel_turn_and_continue(client, server):
    with client.session() as s:
        it = s.turn(messages=[{"role": "user", "content": "a long answer"}], max_tokens=CONTEXT // 2,
                    temperature=0)
        next(it)
        s.cancel()
        items = list(it)
        assert items[-1].finish_reason == "cancelled"
        _, done = s.say("short", max_tokens=3, temperature=0)
        assert done.usage["completion_tokens"] >= 1
    assert wait_until(lambda: kv_used(server) == 0)


def test_session_turn_left_early_is_cancelled_and_never_leaks_into_the_next(client, server):
    """A turn the caller stops reading (``break``, or an iterator simply left open) is cancelled
    when the next turn starts; that turn yields only its own tokens and final."""
    with client.session() as s:
        for _ in s.turn("a long answer", max_tokens=CONTEXT // 2, temperature=0):
            break
        tokens, done = split(list(s.turn("short", max_tokens=3, temperature=0)))
        assert done.finish_reason != "cancelled"
        assert 1 <= len(tokens) == done.usage["completion_tokens"] <= 3
        left_open = s.turn("another long answer", max_tokens=CONTEXT // 2, temperature=0)
        next(left_open)
        tokens, done = split(list(s.turn("short again", max_tokens=2, temperature=0)))
        assert done.finish_reason != "cancelled" and len(tokens) == done.usage["completion_tokens"] <= 2
        assert not s._abandoned  # the given-up turns' finals arrived and were skipped
        # a stale iterator neither steals the current turn's tokens nor cancels it
        stale = s.turn("yet another long answer", max_tokens=CONTEXT // 2, temperature=0)
        next(stale)
        current = s.turn("short at last", max_tokens=4, temperature=0)
        first = next(current)
        assert list(stale) == []  # given up by the new turn: it ends, yielding nothing more
        stale.close()
        tokens, done = split([first] + list(current))
        assert done.finish_reason != "cancelled" and len(tokens) == done.usage["completion_tokens"] <= 4
    assert wait_until(lambda: kv_used(server) == 0)


def test_what_is_left_of_an_abandoned_turn_is_skipped_but_not_a_close():
    from engine.client import belongs_to_abandoned

    abandoned = {"t1"}
    chunk = pb.SessionResponse(turn_id="t1", chunk=pb.TokenChunk(token_ids=[5]))
    assert belongs_to_abandoned(abandoned, chunk) and abandoned == {"t1"}
    assert not belongs_to_abandoned(abandoned, pb.SessionResponse(turn_id="t2", chunk=pb.TokenChunk()))
    closed = pb.SessionResponse(turn_id="t1", closed=pb.SessionClosed(reason="shutdown"))
    assert not belongs_to_abandoned(abandoned, closed)  # the session's end reaches the current turn
    assert belongs_to_abandoned(abandoned, pb.SessionResponse(turn_id="t1", final=pb.Final()))
    assert abandoned == set()  # its final arrived: nothing more to skip


def test_session_refuses_chat_messages_after_raw_turns(client):
    """A text or token_ids turn has no chat messages a template could render again: a messages
    turn after one is refused (the session stays open) instead of silently dropping it."""
    with client.session() as s:
        s.turn("raw text first", max_tokens=2, temperature=0).__next__()
        with pytest.raises(SessionError, match="messages: this session already holds text or token_ids"):
            s.say("now chat", max_tokens=2, temperature=0)
        _, done = split(list(s.turn(" more raw text", max_tokens=2, temperature=0)))
        assert done.usage["cached_tokens"] > 0


def test_session_idle_expiry_frees_blocks(client, server):
    s = client.session(idle_timeout_s=1)
    s.say("hi", max_tokens=3, temperature=0)
    assert kv_used(server) > 0
    time.sleep(1.6)
    with pytest.raises(SessionError) as e:
        list(s.turn("too late", max_tokens=3))
    assert "idle" in str(e.value)
    assert wait_until(lambda: kv_used(server) == 0)
    s.close()


def test_session_idle_timeout_is_bounded(client):
    with pytest.raises(grpc.RpcError) as e:
        client.session(idle_timeout_s=10**6)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idle_timeout_s=1000000 exceeds the limit of 86400 s" in e.value.details()
    with client.session() as s:
        with pytest.raises(SessionError, match="turn_id has 300 characters, limit 256"):
            list(s.turn("hi", turn_id="t" * 300, max_tokens=2))
        assert isinstance(list(s.turn("hi", max_tokens=2, temperature=0))[-1], Completion)  # goes on


def test_session_turns_sent_together_run_in_order(client, server):
    resps = session_script(client, [pb.SessionRequest(open=pb.SessionOpen()),
                                     turn("a", "one two"), turn("b", " three"), turn("c", " four")])
    finals = [(r.turn_id, r.final) for r in resps if r.WhichOneof("kind") == "final"]
    assert [t for t, _ in finals] == ["a", "b", "c"]
    assert finals[1][1].usage.cached_tokens > 0 and finals[2][1].usage.cached_tokens > 0
    assert resps[0].WhichOneof("kind") == "opened"
    assert wait_until(lambda: kv_used(server) == 0)  # the half-closed session was closed


def test_session_queue_is_bounded_and_cancellable(client):
    script = [pb.SessionRequest(open=pb.SessionOpen()), turn("run", "x", 300)]
    script += [turn(f"q{i}", " y", 2) for i in range(5)]  # 4 fit in the queue, the 5th does not
    script += [pb.SessionRequest(cancel=pb.CancelTurn(turn_id="q3")),
               pb.SessionRequest(cancel=pb.CancelTurn(turn_id="run"))]
    resps = session_script(client, script)
    errors = [r for r in resps if r.WhichOneof("kind") == "error"]
    assert [(e.turn_id, e.error.code) for e in errors] == [("q4", "RESOURCE_EXHAUSTED")]
    assert "limit 4" in errors[0].error.message
    finals = {r.turn_id: r.final.finish_reason for r in resps if r.WhichOneof("kind") == "final"}
    assert finals["q3"] == "cancelled" and finals["run"] in ("cancelled", "stop")
    assert {"q0", "q1", "q2"} <= set(finals) and "q4" not in finals


def test_session_outcomes_are_counted_once(client, server):
    """A refused turn counts as an error, a cancelled queued turn as a cancelled request, and a
    turn ended by the stream's deadline once, as DEADLINE_EXCEEDED (as a Generate's deadline)."""
    key = 'wafer_request_%s_total{%s,model_name="tiny"}'
    invalid = key % ("errors", 'code="INVALID_ARGUMENT"')
    cancelled = key % ("success", 'finished_reason="cancelled"')
    deadline = key % ("errors", 'code="DEADLINE_EXCEEDED"')
    late = key % ("success", 'finished_reason="deadline"')
    before = scrape(server.metrics_url)
    bad = pb.SessionRequest(turn=pb.Turn(turn_id="bad", text="x", sampling=pb.SamplingParams(top_p=2)))
    resps = session_script(client, [pb.SessionRequest(open=pb.SessionOpen()), bad,
                                     turn("long", "run", CONTEXT - 10), turn("queued", "wait"),
                                     pb.SessionRequest(cancel=pb.CancelTurn(turn_id="queued")),
                                     pb.SessionRequest(cancel=pb.CancelTurn(turn_id="long"))])
    assert [(r.turn_id, r.final.finish_reason) for r in resps if r.WhichOneof("kind") == "final"] == [
        ("queued", "cancelled"), ("long", "cancelled")]
    after = scrape(server.metrics_url)
    assert after[invalid] - before.get(invalid, 0) == 1
    assert after[cancelled] - before.get(cancelled, 0) == 2
    def open_then_wait():  # the stream stays open: its deadline ends it mid-turn
        yield pb.SessionRequest(open=pb.SessionOpen())
        yield turn("slow", "slow", CONTEXT - 10)
        time.sleep(2)

    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Session(open_then_wait(), timeout=0.1))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: scrape(server.metrics_url).get(deadline, 0) - after.get(deadline, 0) == 1)
    # when the engine's deadline check ends the turn first, the turn gets a final "deadline"
    # before the status: that final is not counted as a success too
    from engine.sampling import SamplingParams
    from engine.scheduler import FINISH_DEADLINE, FinishEvent, SeqStats
    from engine.server.stream import StreamState

    st = StreamState("tiny", time.monotonic_ns(), 1, server.server.metrics,
                     server.runtime().detokenizer(SamplingParams()))
    assert st.final(FinishEvent(FINISH_DEADLINE, SeqStats())).finish_reason == "deadline"
    assert scrape(server.metrics_url).get(late, 0) == after.get(late, 0) == 0


def test_async_client_generate_and_session(server):
    import asyncio

    from engine.client import AsyncWaferClient

    async def main():
        async with AsyncWaferClient(server.address, timeout=60) as c:
            text, done = await c.complete("async hello", max_tokens=5, temperature=0)
            assert done.usage["completion_tokens"] >= 1
            assert (await c.get_model("tiny")).name == "tiny"
            assert await c.tokenize("hello") == server.runtime().tokenizer.encode("hello")
            async with await c.session() as s:
                _, d1 = await s.say("first", max_tokens=4, temperature=0)
                _, d2 = await s.say("second", max_tokens=4, temperature=0)
                assert d2.usage["cached_tokens"] > 0
                async for _ in s.turn(messages=[{"role": "user", "content": "a long answer"}],
                                      max_tokens=CONTEXT // 2, temperature=0):
                    break  # given up: cancelled, its remaining tokens never reach the next turn
                reply, d3 = await s.say("third", max_tokens=3, temperature=0)
                assert d3.finish_reason != "cancelled" and d3.usage["completion_tokens"] <= 3
                # a stale generator closed late does not cancel the current turn
                stale = s.turn(messages=[{"role": "user", "content": "long"}], max_tokens=CONTEXT // 2,
                               temperature=0)
                await stale.__anext__()
                current = s.turn(messages=[{"role": "user", "content": "fourth"}], max_tokens=3,
                                 temperature=0)
                first = await current.__anext__()
                await stale.aclose()
                items = [first] + [item async for item in current]
                assert items[-1].finish_reason != "cancelled"
            async with await c.session() as s2:  # left early right before the session closes
                async for _ in s2.turn("bye", max_tokens=CONTEXT // 2, temperature=0):
                    break
            assert not s2._abandoned
            async with await c.session() as s3:  # a timeout around a turn is the caller's TimeoutError
                turn = s3.turn("slow", max_tokens=CONTEXT // 2, temperature=0)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(turn.__anext__(), 0.0001)
            assert s.closed_reason == "client"
        return text

    sync_text, _ = WaferClient(server.address).complete("async hello", max_tokens=5, temperature=0)
    assert asyncio.run(main()) == sync_text
