"""The gRPC server on loopback with a tiny synthetic model, Generate calls: streaming, coalescing,
batching, cancellation, deadlines, admission, the publisher's hand-off, and a mixed load."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.server.app import ServerOptions
from engine.client import Completion, SessionError, Token
from engine.server.registry import ModelEntry, Registry
from engine.server.testing import ServerThread
from fault.faults import slow_engine
from protos import wafer_pb2 as pb
from serving import CONTEXT, client, kv_used, model_path, server, split, wait_until  # noqa: F401 (fixtures)

def test_the_loaded_model_is_left_out_of_garbage_collections(server):
    """A full collection walks every object loading left behind (the vocabulary, GGUF metadata,
    Numba's types) holding the GIL; once a model is ready its heap is frozen out of collections."""
    tokens = server.runtime("tiny").model.tokenizer.tokens
    assert gc.is_tracked(tokens)
    assert not any(o is tokens for o in gc.get_objects())  # in no generation a collection walks


def test_stream_order_and_usage(client, server):
    tokens, done = split(list(client.generate("hello world", max_tokens=24, temperature=0)))
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert done.usage["completion_tokens"] == len(tokens)
    assert done.usage["prompt_tokens"] == len(client.tokenize("hello world"))
    assert done.finish_reason in ("length", "stop")
    if done.finish_reason == "length":
        assert len(tokens) == 24
    assert done.usage["ttft_ms"] > 0 and done.usage["e2e_ms"] >= done.usage["ttft_ms"]
    assert all(t.engine_step_ns > 0 and t.batch_size >= 1 for t in tokens)
    assert wait_until(lambda: kv_used(server) == 0)


def test_coalescing_groups_tokens(client, server):
    req = pb.GenerateRequest(text="hello world", coalesce_tokens=5,
                             sampling=pb.SamplingParams(temperature=0, max_tokens=23))
    msgs = list(client.stub.Generate(req, timeout=30))
    chunks = [m.chunk for m in msgs if m.HasField("chunk")]
    assert msgs[-1].HasField("final")
    n = msgs[-1].final.usage.completion_tokens
    sizes = [len(c.token_ids) for c in chunks]
    assert sum(sizes) == n
    assert all(s == 5 for s in sizes[:-1])
    assert [c.index for c in chunks] == [5 * i for i in range(len(chunks))]
    # same tokens as uncoalesced
    plain = [t.id for t in client.generate("hello world", max_tokens=23, temperature=0)
             if isinstance(t, Token)]
    assert [i for c in chunks for i in c.token_ids] == plain


def test_logprobs(client):
    tokens, _ = split(list(client.generate("abc", max_tokens=4, temperature=0, logprobs=3)))
    for t in tokens:
        assert len(t.top_logprobs) == 3
        assert t.logprob <= 0
        assert t.top_logprobs[0][0] == t.id  # greedy picks the most likely token


def test_concurrent_streams_share_decode_steps(client, server):
    prompts = [f"stream number {i} says" for i in range(8)]
    alone = {p: [t.id for t in client.generate(p, max_tokens=40, temperature=0) if isinstance(t, Token)]
             for p in prompts[:3]}
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: split(list(client.generate(p, max_tokens=40, temperature=0))),
                                prompts))
    assert max(done.usage["max_batch_size"] for _, done in results) > 1
    assert max(t.batch_size for toks, _ in results for t in toks) > 1
    # batching never changes a greedy stream
    for p, (toks, _) in zip(prompts, results):
        if p in alone:
            assert [t.id for t in toks] == alone[p]
    assert wait_until(lambda: kv_used(server) == 0)


def test_cancel_mid_stream_frees_blocks(client, server):
    call = client.stub.Generate(pb.GenerateRequest(
        text="cancel me", sampling=pb.SamplingParams(temperature=0, max_tokens=CONTEXT - 10)), timeout=60)
    got = 0
    for resp in call:
        got += resp.HasField("chunk")
        if got == 3:
            assert kv_used(server) > 0
            call.cancel()
            break
    assert wait_until(lambda: kv_used(server) == 0 and server.runtime().scheduler.num_running == 0)
    # the server still serves
    _, done = split(list(client.generate("after cancel", max_tokens=3, temperature=0)))
    assert done.usage["completion_tokens"] >= 1


def test_client_stopping_iteration_cancels(client, server):
    gen = client.generate("walk away", max_tokens=CONTEXT - 10, temperature=0)
    next(gen)
    gen.close()  # the client's generator cancels the call
    assert wait_until(lambda: kv_used(server) == 0)


def test_deadline_exceeded_stops_generation(client, server):
    # 2 ms a decode step: ~2 s of generation, so the deadline always comes first (the tiny model
    # alone decodes ~5 tokens a ms and sometimes finished inside 150 ms)
    with slow_engine(server, "tiny", decode_s=0.002), pytest.raises(grpc.RpcError) as e:
        list(client.generate("deadline", max_tokens=CONTEXT - 10, temperature=0, timeout=0.15))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: kv_used(server) == 0 and server.runtime().scheduler.num_running == 0)


def test_overload_gives_resource_exhausted_and_stays_healthy(client, server):
    def run(i):
        try:
            return split(list(client.generate(f"load {i}", model="tiny-narrow", max_tokens=200,
                                              temperature=0)))[1]
        except grpc.RpcError as e:
            return e

    with cf.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(run, range(10)))
    refused = [r for r in results if isinstance(r, grpc.RpcError)]
    served = [r for r in results if isinstance(r, Completion)]
    assert refused and served
    assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "max_waiting=2" in refused[0].details()
    health = health_pb2_grpc.HealthStub(client.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="wafer.v1.Wafer")).status == \
        health_pb2.HealthCheckResponse.SERVING
    _, done = split(list(client.generate("still here", model="tiny-narrow", max_tokens=3, temperature=0)))
    assert done.usage["completion_tokens"] >= 1
    assert wait_until(lambda: kv_used(server, "tiny-narrow") == 0)


def test_client_keeps_text_that_comes_without_a_token():
    """A chunk with text and no token (text held back until the end) goes to Completion.text."""
    from engine.client import chunk_tokens, final_completion

    tail: list[str] = []
    assert [t.text for t in chunk_tokens(pb.TokenChunk(token_ids=[5], text="a"), 0, tail)] == ["a"]
    assert chunk_tokens(pb.TokenChunk(text="bc"), 0, tail) == []
    assert final_completion(pb.Final(finish_reason="length"), tail).text == "bc" and tail == []


def test_publisher_keeps_each_stream_in_order():
    """Events reach a stream's queue in the order they were published, whether they went through
    the notifier thread or (``quiet``) straight from the publishing thread; a quiet hand-over
    waits its turn while an earlier batch is still in flight."""
    import asyncio
    import threading

    from engine import scheduler as sch
    from engine.server.publisher import Publisher

    loop = asyncio.new_event_loop()
    q: asyncio.Queue = asyncio.Queue()
    req = sch.Request([1], None, owner=(loop, q))
    gate, hops = threading.Event(), []

    def after_hop():  # holds the notifier thread after its first hand-off
        hops.append(1)
        if len(hops) == 1:
            gate.wait(10)

    def step(tok):
        return [(None, sch.DecodeStep([req], [tok], 0, 1, 0, None))]

    def first(tok):
        return [(req, sch.TokenEvent(tok, 0, 1, 0))]

    async def received(n):
        return [(await asyncio.wait_for(q.get(), 10))[1].token_id for _ in range(n)]

    pub = Publisher(after_hop)
    try:
        pub(step(1))
        assert wait_until(lambda: hops)
        pub(step(2))              # queued behind the held notifier thread
        pub(first(3), quiet=True)  # must not overtake 2
        gate.set()
        assert loop.run_until_complete(received(3)) == [1, 2, 3]
        assert wait_until(lambda: len(hops) == 2)
        pub(first(4), quiet=True)  # nothing in flight: handed over before the call returns
        loop.run_until_complete(asyncio.sleep(0))
        assert q.qsize() == 1
        pub(step(5), quiet=True)  # a decode step always goes through the notifier thread
        assert loop.run_until_complete(received(2)) == [4, 5]
    finally:
        pub.close()
        loop.close()


def test_mixed_load_every_call_ends_and_the_pool_empties(model_path):
    """60 concurrent calls on a small pool, seeded: greedy and sampled generates, stop strings,
    clients that break off, deadlines that expire, sessions of several turns. Every call ends with
    a final or a gRPC status (never a hang or INTERNAL), and afterwards no KV block is held."""
    import asyncio
    import random

    from engine.client import AsyncWaferClient

    reg = Registry([ModelEntry(name="tiny", path=str(model_path), max_batch=8, kv_blocks=24, max_waiting=64)])
    rnd = random.Random(4)

    async def generate(c, r):
        kw = dict(max_tokens=r.choice([1, 5, 40]), temperature=r.choice([0.0, 0.8]), seed=r.randrange(99))
        if r.random() < 0.3:
            kw["stop"] = [r.choice(["a", "the", "ab"])]
        breaks_off = r.random() < 0.2
        n = 0
        try:
            async for item in c.generate("x" * r.choice([1, 10, 200]), timeout=r.choice([None, 0.001, 0.05, 0.5]), **kw):
                if isinstance(item, Completion):
                    return "final"
                n += 1
                if breaks_off and n == 2:
                    return "broke off"
            return "no final"
        except grpc.aio.AioRpcError as e:
            return e.code().name

    async def session(c, r):
        try:
            async with await c.session() as s:
                for _ in range(r.choice([1, 2, 4])):
                    await s.say("hello " * r.choice([1, 20]), max_tokens=r.choice([3, 20]), temperature=0)
            return "session"
        except SessionError as e:  # a conversation outgrowing the small pool is refused, by name
            return "turn refused" if "INVALID_ARGUMENT" in str(e) else f"session error {e}"

    async def main(address):
        async with AsyncWaferClient(address, timeout=60) as c:
            calls = []
            for _ in range(60):
                await asyncio.sleep(rnd.random() * 0.01)
                r = random.Random(rnd.random())
                calls.append(asyncio.ensure_future(session(c, r) if r.random() < 0.2 else generate(c, r)))
            return await asyncio.wait_for(asyncio.gather(*calls), 120)

    with ServerThread(reg, ServerOptions(port=0, metrics_port=None)) as srv:
        outcomes = asyncio.run(main(srv.address))
        sched = next(iter(srv.server.runtimes.values())).scheduler
        deadline = time.monotonic() + 10
        while (sched.allocator.num_used or not sched.idle()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sched.allocator.num_used == 0 and not sched.sessions
    allowed = {"final", "broke off", "session", "turn refused", "DEADLINE_EXCEEDED"}
    assert set(outcomes) <= allowed, [o for o in outcomes if o not in allowed]
    assert {"final", "broke off", "session", "DEADLINE_EXCEEDED"} <= set(outcomes)
