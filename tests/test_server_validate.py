"""Requests the server refuses: INVALID_ARGUMENT (and the like) naming the field and the limit,
huge prompts refused before they are encoded whole, and how refusals are counted."""

from __future__ import annotations

import grpc
import pytest

from engine.server.servicer import abandoned_status
from engine.server.validate import PROBE_CHARS_PER_TOKEN, Invalid, sampling_params
from protos import wafer_pb2 as pb
from serving import CONTEXT, client, model_path, server  # noqa: F401 (fixtures)

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


def test_refusing_a_call_that_has_ended_is_quiet(server):
    """A refusal racing the call's own deadline: abort fails inside gRPC; when the call is done
    that is not an error of ours (gRPC would log a traceback), otherwise it propagates."""
    import asyncio

    class Ended:
        def __init__(self, done):
            self._done = done

        async def abort(self, *a, **kw):
            raise RuntimeError("ExecuteBatchError")

        def done(self):
            return self._done

    servicer = server.server.servicer
    asyncio.run(servicer.abort(Ended(True), Invalid(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), "tiny"))
    with pytest.raises(RuntimeError):
        asyncio.run(servicer.abort(Ended(False), Invalid(grpc.StatusCode.INTERNAL, "x"), "tiny"))


def test_abandoned_call_status():
    """A call that ended before its final is counted under the status its client saw: the
    client's own timer fires while the server's copy of the deadline has a few ms left."""
    assert abandoned_status(0.004) == abandoned_status(-1.0) == "DEADLINE_EXCEEDED"
    assert abandoned_status(None) == abandoned_status(5.0) == "CANCELLED"


def test_client_names_a_misplaced_keyword():
    from engine.client import sampling

    with pytest.raises(TypeError, match="text= is not a sampling parameter.*raw text is the first argument"):
        sampling(text="hi")


def test_word_boundaries_for_the_prompt_probe():
    """Where a huge prompt may be cut to count a prefix's tokens: only where a tokenizer surely
    starts a new piece, so the prefix never has more tokens than the whole."""
    from engine.server.validate import word_boundary_before as cut

    assert cut("abc def ghi", 10) == 7          # before whitespace
    assert cut("abcde,fghij", 8) == 5            # before punctuation that follows a letter
    assert cut("12345678", 7) == 7               # digits: split singly or grouped from the left
    assert cut("abcdefghij", 9) == -1            # one giant word: nowhere safe
    assert cut("ab,,,,,,,,", 9) == -1            # inside a punctuation run: no (2 is below end/2)
