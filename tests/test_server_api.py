"""The gRPC server on loopback with a tiny synthetic model: streaming, batching, cancellation,
deadlines, admission, validation, lifecycle, sessions, health, reflection, metrics."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import re
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.server.app import ServerOptions
from engine.client import Completion, SessionError, Token, WaferClient
from engine.server.registry import ModelEntry, Registry
from engine.server.servicer import PROBE_CHARS_PER_TOKEN, Invalid, abandoned_status, sampling_params
from engine.server.testing import ServerThread
from protos import wafer_pb2 as pb

CONTEXT = 1024


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=CONTEXT)


@pytest.fixture(scope="module")
def server(model_path):
    registry = Registry([
        ModelEntry(name="tiny", path=str(model_path), aliases=("tiny-latest",), max_batch=16),
        ModelEntry(name="tiny-2024", path=str(model_path), max_batch=16, status="deprecated",
                   sunset="2099-12-31", successor="tiny"),
        ModelEntry(name="tiny-2020", status="retired", successor="tiny"),
        # a tight admission queue for the overload test (its own engine: different limits)
        ModelEntry(name="tiny-narrow", path=str(model_path), max_batch=1, max_waiting=2),
    ], default="tiny")
    with ServerThread(registry, ServerOptions(port=0, metrics_port=0,
                                              session_idle_timeout_s=60)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with WaferClient(server.address, timeout=60) as c:
        yield c


def split(items):
    tokens = [i for i in items if isinstance(i, Token)]
    finals = [i for i in items if isinstance(i, Completion)]
    assert len(finals) == 1 and isinstance(items[-1], Completion), "exactly one final, last"
    return tokens, finals[0]


def wait_until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def kv_used(server, name="tiny"):
    return server.runtime(name).scheduler.allocator.num_used


def test_the_loaded_model_is_left_out_of_garbage_collections(server):
    """A full collection walks every object loading left behind (the vocabulary, GGUF metadata,
    Numba's types) holding the GIL; once a model is ready its heap is frozen out of collections."""
    tokens = server.runtime("tiny").model.tokenizer.tokens
    assert gc.is_tracked(tokens)
    assert not any(o is tokens for o in gc.get_objects())  # in no generation a collection walks


# ------------------------------------------------------------------------------ streaming


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
    with pytest.raises(grpc.RpcError) as e:
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


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kw, field", [
    (dict(max_tokens=100000), "max_tokens=100000"),
    (dict(max_tokens=0), "max_tokens=0"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop_token_ids=[99999]), "stop_token_ids"),
    (dict(stop_token_ids=[1] * 257), "stop_token_ids: 257 ids, limit 256"),
    (dict(stop=[""]), "stop[0]"),
    (dict(logprobs=50), "logprobs"),
])
def test_invalid_sampling(client, kw, field):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("x", **kw))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_invalid_inputs(client, server):
    cases = [
        (pb.GenerateRequest(), "empty prompt"),
        (pb.GenerateRequest(text=""), "empty prompt"),
        (pb.GenerateRequest(messages=pb.Messages()), "messages"),
        (pb.GenerateRequest(messages=pb.Messages(messages=[pb.ChatMessage(role="robot", content="x")])),
         "role"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5000000])), "token_ids[1]"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * (CONTEXT + 5))), "context"),
        (pb.GenerateRequest(text="x", coalesce_tokens=1000), "coalesce_tokens"),
        (pb.GenerateRequest(text="x", request_id="r" * 257), "request_id has 257 characters, limit 256"),
        (pb.GenerateRequest(text="x", request_id="a\nfake log line"), "request_id must be one line"),
        # many tiny messages: refused on their count, not encoded first
        (pb.GenerateRequest(messages=pb.Messages(messages=[pb.ChatMessage(role="user", content="a")]
                                                 * (CONTEXT + 1))), f"{CONTEXT + 1} messages cannot fit"),
    ]
    # a text no tokenization could fit in the context is refused before it is encoded
    max_chars = CONTEXT * server.runtime().tokenizer.max_token_chars
    for req in (pb.GenerateRequest(text="y" * (max_chars + 1)), pb.GenerateRequest(
            messages=pb.Messages(messages=[pb.ChatMessage(role="user", content="y" * (max_chars + 1))]))):
        cases.append((req, f"{max_chars + 1} characters"))
    # under that bound but past PROBE_CHARS_PER_TOKEN per token of context: refused on a prefix
    text = " ".join(f"w{i % 977}" for i in range(2400))
    assert CONTEXT * PROBE_CHARS_PER_TOKEN < len(text) <= max_chars
    cases.append((pb.GenerateRequest(text=text), "alone are"))
    for req, needle in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(client.stub.Generate(req, timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, req
        assert needle in e.value.details()


def test_sampling_limits_named_exactly():
    """An unset max_tokens fits a KV pool smaller than the context (an explicit one is refused
    naming the pool); a value just past a bound is not printed rounded into it."""
    limits = dict(vocab_size=320, context_length=1024, prompt_len=2, kv_tokens=128)
    assert sampling_params(pb.SamplingParams(), **limits).max_tokens == 126
    with pytest.raises(Invalid, match="exceed the KV pool of 128 tokens"):
        sampling_params(pb.SamplingParams(max_tokens=127), **limits)
    with pytest.raises(Invalid, match=r"top_p=1\.0000001\d* must be in \(0, 1\]"):
        sampling_params(pb.SamplingParams(top_p=1.0000001), **limits)


def test_session_idle_timeout_is_bounded(client):
    with pytest.raises(grpc.RpcError) as e:
        client.session(idle_timeout_s=10**6)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idle_timeout_s=1000000 exceeds the limit of 86400 s" in e.value.details()
    with client.session() as s:
        with pytest.raises(SessionError, match="turn_id has 300 characters, limit 256"):
            list(s.turn("hi", turn_id="t" * 300, max_tokens=2))
        assert isinstance(list(s.turn("hi", max_tokens=2, temperature=0))[-1], Completion)  # goes on


def test_refusing_a_call_that_has_ended_is_quiet(server):
    """A refusal racing the call's own deadline: abort fails inside gRPC; when the call is done
    that is not an error of ours (gRPC would log a traceback), otherwise it propagates."""
    import asyncio

    from engine.server.servicer import Invalid

    class Ended:
        def __init__(self, done):
            self._done = done

        async def abort(self, *a, **kw):
            raise RuntimeError("ExecuteBatchError")

        def done(self):
            return self._done

    servicer = server.server.servicer
    asyncio.run(servicer._abort(Ended(True), Invalid(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), "tiny"))
    with pytest.raises(RuntimeError):
        asyncio.run(servicer._abort(Ended(False), Invalid(grpc.StatusCode.INTERNAL, "x"), "tiny"))


def test_abandoned_call_status():
    """A call that ended before its final is counted under the status its client saw: the
    client's own timer fires while the server's copy of the deadline has a few ms left."""
    assert abandoned_status(0.004) == abandoned_status(-1.0) == "DEADLINE_EXCEEDED"
    assert abandoned_status(None) == abandoned_status(5.0) == "CANCELLED"


def test_client_names_a_misplaced_keyword():
    from engine.client import sampling

    with pytest.raises(TypeError, match="text= is not a sampling parameter.*raw text is the first argument"):
        sampling(text="hi")


def test_calls_without_ids_are_named_in_the_log(client, caplog):
    caplog.set_level(logging.DEBUG, logger="engine.scheduler")
    list(client.generate("log me", max_tokens=2, temperature=0))
    with client.session() as s:
        list(s.turn("and me", turn_id="t-7", max_tokens=2, temperature=0))
    finished = [r.getMessage() for r in caplog.records if "finished" in r.getMessage()]
    assert any(re.match(r"request 'g\d+' ", m) for m in finished), finished
    assert any(re.match(r"request 's\d+/t-7' ", m) for m in finished), finished


def test_client_keeps_text_that_comes_without_a_token():
    """A chunk with text and no token (text held back until the end) goes to Completion.text."""
    from engine.client import chunk_tokens, final_completion

    tail: list[str] = []
    assert [t.text for t in chunk_tokens(pb.TokenChunk(token_ids=[5], text="a"), 0, tail)] == ["a"]
    assert chunk_tokens(pb.TokenChunk(text="bc"), 0, tail) == []
    assert final_completion(pb.Final(finish_reason="length"), tail).text == "bc" and tail == []


def test_unknown_model_not_found(client):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("x", model="gpt-17"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "gpt-17" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.get_model("gpt-17")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # a client's long name is not echoed whole
        client.get_model("x" * 10_000)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and len(e.value.details()) < 300


# ------------------------------------------------------------------------------ models


def test_models_and_lifecycle(client, server):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"tiny", "tiny-2024", "tiny-2020", "tiny-narrow"}
    t = models["tiny"]
    assert t.loaded and t.context_length == CONTEXT and t.architecture == "llama"
    assert t.parameters > 0 and t.quantization.startswith("Q4_1") and list(t.aliases) == ["tiny-latest"]
    assert models["tiny-2024"].lifecycle.status == "deprecated"
    assert models["tiny-2020"].lifecycle.status == "retired" and not models["tiny-2020"].loaded
    assert client.get_model("tiny-latest").name == "tiny"
    assert [m.name for m in models.values() if m.is_default] == ["tiny"]
    assert t.kv_pool_tokens == server.runtime("tiny").kv_tokens > 0
    assert models["tiny-2020"].kv_pool_tokens == 0


def test_deprecated_model_served_with_trailing_metadata(client):
    _, done = split(list(client.generate("old", model="tiny-2024", max_tokens=3, temperature=0)))
    md = done.trailing_metadata
    assert md["wafer-deprecated"] == "true"
    assert md["wafer-sunset"] == "2099-12-31"
    assert md["wafer-successor"] == "tiny"
    _, done = split(list(client.generate("new", model="tiny", max_tokens=3, temperature=0)))
    assert "wafer-deprecated" not in done.trailing_metadata
    with client.session(model="tiny-2024") as s:  # and sessions, once closed
        s.say("old", max_tokens=2, temperature=0)
    assert s.trailing_metadata["wafer-successor"] == "tiny"
    # errors on a deprecated model carry it too
    call = client.stub.Generate(pb.GenerateRequest(model="tiny-2024", text=""), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert dict(e.value.trailing_metadata())["wafer-successor"] == "tiny"


def test_cli_warning_for_a_deprecated_model():
    from engine.cli.output import deprecation_warning

    assert deprecation_warning({}, "tiny") is None
    md = {"wafer-deprecated": "true", "wafer-sunset": "2099-12-31", "wafer-successor": "tiny"}
    assert deprecation_warning(md, "tiny-2024") == \
        "warning: model 'tiny-2024' is deprecated and retires on 2099-12-31; use 'tiny'"
    assert deprecation_warning(md, "").startswith("warning: the server's default model is deprecated")


def test_retired_model_refused_naming_successor(client):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate("x", model="tiny-2020"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'tiny'" in e.value.details() and "retired" in e.value.details()
    md = dict(e.value.trailing_metadata())
    assert md["wafer-retired"] == "true" and md["wafer-successor"] == "tiny"


def test_tokenize(client, server):
    tok = server.runtime().tokenizer
    assert client.tokenize("hello world") == tok.encode("hello world")
    msgs = [{"role": "user", "content": "hi"}]
    assert client.tokenize(messages=msgs) == tok.encode_chat(msgs)
    # tokens holding part of a character: pieces show U+FFFD, piece_bytes are exact
    r = client.stub.Tokenize(pb.TokenizeRequest(text="café 日本 🎉"), timeout=10)
    assert b"".join(r.piece_bytes) == "café 日本 🎉".encode() and len(r.pieces) == len(r.ids)
    text = " ".join(f"w{i}" for i in range(CONTEXT + 100))
    assert len(tok.encode(text)) > CONTEXT
    with pytest.raises(grpc.RpcError) as e:  # longer than the context: refused, as in Generate
        client.tokenize(text)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text: prompt of" in e.value.details() and f"context of {CONTEXT} tokens" in e.value.details()


# ------------------------------------------------------------------------------ sessions


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


def _session_script(client, requests):
    """Send a whole script of SessionRequests then half-close (as grpcurl does); all responses."""
    return list(client.stub.Session(iter(requests), timeout=60))


def _turn(tid, text, n=6):
    return pb.SessionRequest(turn=pb.Turn(turn_id=tid, text=text, sampling=pb.SamplingParams(
        max_tokens=n, temperature=0)))


def test_session_turns_sent_together_run_in_order(client, server):
    resps = _session_script(client, [pb.SessionRequest(open=pb.SessionOpen()),
                                     _turn("a", "one two"), _turn("b", " three"), _turn("c", " four")])
    finals = [(r.turn_id, r.final) for r in resps if r.WhichOneof("kind") == "final"]
    assert [t for t, _ in finals] == ["a", "b", "c"]
    assert finals[1][1].usage.cached_tokens > 0 and finals[2][1].usage.cached_tokens > 0
    assert resps[0].WhichOneof("kind") == "opened"
    assert wait_until(lambda: kv_used(server) == 0)  # the half-closed session was closed


def test_session_queue_is_bounded_and_cancellable(client):
    script = [pb.SessionRequest(open=pb.SessionOpen()), _turn("run", "x", 300)]
    script += [_turn(f"q{i}", " y", 2) for i in range(5)]  # 4 fit in the queue, the 5th does not
    script += [pb.SessionRequest(cancel=pb.CancelTurn(turn_id="q3")),
               pb.SessionRequest(cancel=pb.CancelTurn(turn_id="run"))]
    resps = _session_script(client, script)
    errors = [r for r in resps if r.WhichOneof("kind") == "error"]
    assert [(e.turn_id, e.error.code) for e in errors] == [("q4", "RESOURCE_EXHAUSTED")]
    assert "limit 4" in errors[0].error.message
    finals = {r.turn_id: r.final.finish_reason for r in resps if r.WhichOneof("kind") == "final"}
    assert finals["q3"] == "cancelled" and finals["run"] in ("cancelled", "stop")
    assert {"q0", "q1", "q2"} <= set(finals) and "q4" not in finals


# ------------------------------------------------------------------------------ operations


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase)

    with grpc.insecure_channel(server.address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = db.get_services()
        assert "wafer.v1.Wafer" in services and "grpc.health.v1.Health" in services
        fd = db.FindFileContainingSymbol("wafer.v1.Wafer")
        assert fd.package == "wafer.v1"
        assert "Generate" in [m.name for m in fd.service[0].method]


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_move(client, server):
    before = _scrape(server.metrics_url)
    client.complete("metrics please", max_tokens=6, temperature=0)
    after = _scrape(server.metrics_url)
    lbl = '{model_name="tiny"}'
    for name in ("wafer_time_to_first_token_seconds_count", "wafer_e2e_request_latency_seconds_count",
                 "wafer_inter_token_latency_seconds_count", "wafer_request_queue_time_seconds_count",
                 "wafer_generation_tokens_total", "wafer_prompt_tokens_total"):
        assert after[name + lbl] > before.get(name + lbl, 0), name
    assert "wafer_kv_cache_usage_perc" + lbl in after
    assert "wafer_num_requests_running" + lbl in after and "wafer_num_requests_waiting" + lbl in after
    assert any(k.startswith("wafer_request_success_total") and "finished_reason" in k for k in after)
    assert after["wafer_batch_size_count" + lbl] > 0
    # a name no model has is counted as "unknown": clients cannot create label values at will
    for name in ("nope", "/etc/passwd"):
        with pytest.raises(grpc.RpcError):
            client.get_model(name)
    errors = {k: v for k, v in _scrape(server.metrics_url).items() if k.startswith("wafer_request_errors_total")}
    assert errors['wafer_request_errors_total{code="NOT_FOUND",model_name="unknown"}'] >= 2
    assert not any("nope" in k or "passwd" in k for k in errors)
    # calls that end before their final - a deadline, a client that stops reading - are counted
    key = 'wafer_request_errors_total{code="%s",model_name="tiny"}'
    grew = lambda code: _scrape(server.metrics_url).get(key % code, 0) > before.get(key % code, 0)  # noqa
    for _ in range(3):  # the client's timer usually ends the call first: still a deadline
        before = _scrape(server.metrics_url)
        with pytest.raises(grpc.RpcError) as e:  # (the tiny model makes ~1000 tokens in 0.15 s)
            list(client.generate("slow", max_tokens=CONTEXT - 10, temperature=0, timeout=0.05))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: grew("DEADLINE_EXCEEDED")), {
            k: v for k, v in _scrape(server.metrics_url).items() if "errors" in k}
        assert not grew("CANCELLED")
    before = _scrape(server.metrics_url)
    for _ in client.generate("left", max_tokens=CONTEXT // 2, temperature=0):
        break
    assert wait_until(lambda: grew("CANCELLED"))
    assert not grew("DEADLINE_EXCEEDED")


def test_session_outcomes_are_counted_once(client, server):
    """A refused turn counts as an error, a cancelled queued turn as a cancelled request, and a
    turn ended by the stream's deadline once, as DEADLINE_EXCEEDED (as a Generate's deadline)."""
    key = 'wafer_request_%s_total{%s,model_name="tiny"}'
    invalid = key % ("errors", 'code="INVALID_ARGUMENT"')
    cancelled = key % ("success", 'finished_reason="cancelled"')
    deadline = key % ("errors", 'code="DEADLINE_EXCEEDED"')
    late = key % ("success", 'finished_reason="deadline"')
    before = _scrape(server.metrics_url)
    bad = pb.SessionRequest(turn=pb.Turn(turn_id="bad", text="x", sampling=pb.SamplingParams(top_p=2)))
    resps = _session_script(client, [pb.SessionRequest(open=pb.SessionOpen()), bad,
                                     _turn("long", "run", CONTEXT - 10), _turn("queued", "wait"),
                                     pb.SessionRequest(cancel=pb.CancelTurn(turn_id="queued")),
                                     pb.SessionRequest(cancel=pb.CancelTurn(turn_id="long"))])
    assert [(r.turn_id, r.final.finish_reason) for r in resps if r.WhichOneof("kind") == "final"] == [
        ("queued", "cancelled"), ("long", "cancelled")]
    after = _scrape(server.metrics_url)
    assert after[invalid] - before.get(invalid, 0) == 1
    assert after[cancelled] - before.get(cancelled, 0) == 2
    def open_then_wait():  # the stream stays open: its deadline ends it mid-turn
        yield pb.SessionRequest(open=pb.SessionOpen())
        yield _turn("slow", "slow", CONTEXT - 10)
        time.sleep(2)

    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.Session(open_then_wait(), timeout=0.1))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _scrape(server.metrics_url).get(deadline, 0) - after.get(deadline, 0) == 1)
    # when the engine's deadline check ends the turn first, the turn gets a final "deadline"
    # before the status: that final is not counted as a success too
    from engine.sampling import SamplingParams
    from engine.scheduler import FINISH_DEADLINE, FinishEvent, SeqStats
    from engine.server.servicer import StreamState

    st = StreamState("tiny", time.monotonic_ns(), 1, server.server.metrics,
                     server.runtime().detokenizer(SamplingParams()))
    assert st.final(FinishEvent(FINISH_DEADLINE, SeqStats())).finish_reason == "deadline"
    assert _scrape(server.metrics_url).get(late, 0) == after.get(late, 0) == 0


def test_health_transitions(model_path):
    reg = Registry([ModelEntry(name="tiny", path=str(model_path))])
    srv = ServerThread(reg, ServerOptions(port=0, metrics_port=None))
    srv.start(wait_ready=False)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            check = lambda: stub.Check(health_pb2.HealthCheckRequest(service="wafer.v1.Wafer"),  # noqa
                                       timeout=5).status
            assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
            srv.call(srv.server.wait_ready(120), 130)
            assert check() == health_pb2.HealthCheckResponse.SERVING
            # draining: NOT_SERVING first, then the port closes
            srv.loop.call_soon_threadsafe(lambda: srv.loop.create_task(srv.server.drain(0.5)))
            assert wait_until(lambda: _status_or_none(check) != health_pb2.HealthCheckResponse.SERVING)
    finally:
        srv.stop()


def test_drain_waits_for_a_slow_step_to_send_the_finals(model_path):
    """The engine ends its streams after its current model call: a step longer than a few
    seconds (a long prefill on a busy machine) must still end each stream with its final."""
    import asyncio

    from engine.client import AsyncWaferClient

    reg = Registry([ModelEntry(name="tiny", path=str(model_path), max_batch=8)])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None)) as srv:
        model = srv.runtime().model
        decode, slept = model.decode, []

        def slow_decode(*args):
            if not slept:  # the step the drain will find running
                slept.append(True)
                time.sleep(3.5)  # past the 2.5 s the drain used to wait
            return decode(*args)

        async def stream(c, i):
            items = [x async for x in c.generate(f"stream {i}", max_tokens=500, temperature=0)]
            return items[-1].finish_reason

        async def main():
            async with AsyncWaferClient(srv.address, timeout=60) as c:
                tasks = [asyncio.ensure_future(stream(c, i)) for i in range(4)]
                await asyncio.sleep(0.3)
                model.decode = slow_decode
                while not slept:
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(srv.drain, 0.0, 60)
                return await asyncio.gather(*tasks)

        assert asyncio.run(main()) == ["shutdown"] * 4


def _status_or_none(check):
    try:
        return check()
    except grpc.RpcError:
        return None


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


def test_engine_runs_below_the_threads_that_stream(model_path):
    """With ``engine_nice`` the engine thread (and the compute threads it starts) runs at a higher
    niceness; the publisher thread that hands tokens to the event loop, and the loop, do not."""
    import os

    def nice(tid):
        return os.getpriority(os.PRIO_PROCESS, tid)

    base = nice(0)
    reg = Registry([ModelEntry(name="tiny", path=str(model_path))])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None, engine_nice=base + 3)) as srv:
        rt = srv.runtime()
        assert nice(rt._thread.native_id) == base + 3
        assert nice(rt.publisher._thread.native_id) == base
        assert nice(srv._thread.native_id) == base
        with WaferClient(srv.address, timeout=60) as c:
            assert c.complete("hi", max_tokens=3, temperature=0)[1].usage["completion_tokens"] == 3
    assert nice(0) == base


def test_engine_sched_idle_runs_the_compute_threads_under_sched_idle(model_path):
    """With ``engine_sched_idle`` the engine thread and the Numba threads it starts run under
    SCHED_IDLE, so a woken streaming thread preempts them at once; the publisher thread and the
    event loop stay normal, and the server still serves."""
    import os

    import numba

    reg = Registry([ModelEntry(name="tiny", path=str(model_path))])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None, engine_sched_idle=True)) as srv:
        rt = srv.runtime()
        engine = rt._thread.native_id
        assert os.sched_getscheduler(engine) == os.SCHED_IDLE
        assert os.sched_getscheduler(rt.publisher._thread.native_id) == os.SCHED_OTHER
        assert os.sched_getscheduler(srv._thread.native_id) == os.SCHED_OTHER
        with WaferClient(srv.address, timeout=60) as c:
            assert c.complete("hi", max_tokens=3, temperature=0)[1].usage["completion_tokens"] == 3
        if numba.threading_layer() == "omp" and numba.get_num_threads() > 1:  # its own workers
            idle = [int(t) for t in os.listdir("/proc/self/task")
                    if int(t) != engine and _policy(int(t)) == os.SCHED_IDLE]
            assert idle, "the compute threads the engine started are not under SCHED_IDLE"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def _policy(tid: int) -> int | None:
    import os

    try:
        return os.sched_getscheduler(tid)
    except OSError:  # the thread has ended
        return None


def _realtime_allowed() -> bool:
    import os
    import threading

    ok = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return bool(ok)


def test_realtime_streaming_lifts_the_streaming_threads_only(model_path):
    """``realtime_streaming``: the event loop and the publisher run under SCHED_RR where the
    process may (else they keep normal priority and the server runs as usual); the engine thread
    never does."""
    import os

    def policy(tid):
        return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK

    expected = os.SCHED_RR if _realtime_allowed() else os.SCHED_OTHER
    reg = Registry([ModelEntry(name="tiny", path=str(model_path))])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None, realtime_streaming=True)) as srv:
        rt = srv.runtime()
        assert policy(srv._thread.native_id) == expected
        assert policy(rt.publisher.native_id) == expected
        assert policy(rt._thread.native_id) == os.SCHED_OTHER
        with WaferClient(srv.address, timeout=60) as c:
            assert c.complete("hi", max_tokens=3, temperature=0)[1].usage["completion_tokens"] == 3


def test_publisher_keeps_each_stream_in_order():
    """Events reach a stream's queue in the order they were published, whether they went through
    the notifier thread or (``quiet``) straight from the publishing thread; a quiet hand-over
    waits its turn while an earlier batch is still in flight."""
    import asyncio
    import threading

    from engine import scheduler as sch
    from engine.server.servicer import Publisher

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
            async for item in c.generate("x" * r.choice([1, 10, 200]), timeout=r.choice([None, 0.05, 0.5]), **kw):
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


def test_busy_ports_are_named(model_path):
    """A port in use ends start() with an OSError saying which port (the gRPC one or the
    metrics one), and the half-started server is stopped."""
    import socket

    reg = Registry([ModelEntry(name="tiny", path=str(model_path))])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot bind the gRPC port 127.0.0.1:{port}"):
            ServerThread(reg, ServerOptions(port=port, metrics_port=None)).start()
        with pytest.raises(OSError, match=f"cannot bind the metrics port 127.0.0.1:{port}"):
            ServerThread(reg, ServerOptions(port=0, metrics_port=port)).start()


def test_drain_while_the_model_loads_does_not_wait_for_it(model_path, monkeypatch):
    """SIGTERM during loading: the server stops without waiting for the load (which cannot be
    interrupted), never reports ready, and the engine never starts serving."""
    import asyncio
    import threading

    from engine.model import Model

    gate = threading.Event()
    load = Model.load.__func__

    def slow_load(cls, *a, **kw):
        gate.wait(30)
        return load(cls, *a, **kw)

    monkeypatch.setattr(Model, "load", classmethod(slow_load))
    reg = Registry([ModelEntry(name="tiny", path=str(model_path))])
    srv = ServerThread(reg, ServerOptions(port=0, metrics_port=None)).start(wait_ready=False)
    try:
        waiting = asyncio.run_coroutine_threadsafe(srv.server.wait_ready(60), srv.loop)
        t0 = time.monotonic()
        srv.drain(5.0, timeout=10)
        assert time.monotonic() - t0 < 3.0  # not the 5 s grace, nor the engine thread's join
        try:  # never said ready (the future may be cancelled between two looks at it)
            said_ready = waiting.result(1)
        except cf.CancelledError:
            said_ready = False
        assert said_ready is False
        rt = srv.runtime()
        gate.set()  # the load completes; the engine thread then ends instead of serving
        assert wait_until(lambda: rt.loaded.is_set() and not rt._thread.is_alive(), 60)
        assert rt.error is None
    finally:
        gate.set()
        srv.stop()


def test_word_boundaries_for_the_prompt_probe():
    """Where a huge prompt may be cut to count a prefix's tokens: only where a tokenizer surely
    starts a new piece, so the prefix never has more tokens than the whole."""
    from engine.server.servicer import _word_boundary_before as cut

    assert cut("abc def ghi", 10) == 7          # before whitespace
    assert cut("abcde,fghij", 8) == 5            # before punctuation that follows a letter
    assert cut("12345678", 7) == 7               # digits: split singly or grouped from the left
    assert cut("abcdefghij", 9) == -1            # one giant word: nowhere safe
    assert cut("ab,,,,,,,,", 9) == -1            # inside a punctuation run: no (2 is below end/2)
