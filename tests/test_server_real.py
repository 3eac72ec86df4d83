"""The server with the real SmolLM2-135M: a real answer over gRPC, batching that does not change
greedy streams, and a persistent session that reuses its KV cache."""

from __future__ import annotations

import concurrent.futures as cf

import pytest

from engine.server.app import ServerOptions
from engine.client import Token, WaferClient
from engine.server.registry import ModelEntry, Registry
from engine.server.testing import ServerThread

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def client(real_model_path):
    reg = Registry([ModelEntry(name="smollm2-135m", path=str(real_model_path), max_batch=8,
                               kv_blocks=256)])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None)) as srv:
        with WaferClient(srv.address, timeout=300) as c:
            yield c


def test_real_answer_streams(client):
    text, done = client.complete(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                 max_tokens=24, temperature=0)
    assert "Paris" in text
    assert done.finish_reason == "stop"
    assert done.usage["prompt_tokens"] == 37
    ids = client.tokenize(messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert len(ids) == 37 and ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]


def test_real_stop_string_cuts_the_text(client):
    """The engine stops on the stop string and the streamed text (made on the server's event loop)
    ends right before it, never showing part of it."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full, _ = client.complete(messages=msgs, max_tokens=24, temperature=0)
    cut = full.index("Paris")
    text, done = client.complete(messages=msgs, max_tokens=24, temperature=0, stop=["Paris"])
    assert done.finish_reason == "stop"
    assert text == full[:cut]
    # a stop string that never occurs changes nothing
    text, done = client.complete(messages=msgs, max_tokens=24, temperature=0, stop=["zebra crossing"])
    assert text == full and done.finish_reason == "stop"


def test_real_concurrent_streams_batch_without_changing_output(client):
    prompts = ["Name three colors.", "Count from one to five.", "Say hello in French.", "What is 2+2?"]
    solo = [t.id for t in client.generate(messages=[{"role": "user", "content": prompts[0]}],
                                          max_tokens=12, temperature=0) if isinstance(t, Token)]

    def run(p):
        return list(client.generate(messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0))

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, prompts))
    assert max(r[-1].usage["max_batch_size"] for r in results) > 1
    assert [t.id for t in results[0] if isinstance(t, Token)] == solo


def test_real_session_reuses_cache(client):
    with client.session() as s:
        reply1, d1 = s.say("My name is Ada. Remember it.", max_tokens=16, temperature=0)
        reply2, d2 = s.say("What is my name?", max_tokens=16, temperature=0)
    u = d2.usage
    assert u["cached_tokens"] >= d1.usage["prompt_tokens"]
    assert u["prefill_tokens"] == u["prompt_tokens"] - u["cached_tokens"]
    fresh, _ = client.complete(messages=[
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": "What is my name?"}], max_tokens=16, temperature=0)
    assert fresh == reply2
