"""Prefix caching through the server: a stateless client resending its conversation reuses the
KV of the previous turn (usage.cached_tokens, the prefix-cache metrics, the emulated TTFT), with
the same tokens as a model serving without it; the switches (registry key, server option)."""

from __future__ import annotations

import pytest

from engine.client import WaferClient
from engine.server.app import ServerOptions
from engine.server.registry import ModelEntry, Registry, RegistryError
from engine.server.testing import ServerThread
from serving import CONTEXT, kv_used, scrape, split, wait_until

FAST = "wse3:smollm2-135m"
QUESTIONS = ["Tell me about the sea and the ships that sail on it.", "And the rivers?",
             "Which is longer, a river or a road?"]


@pytest.fixture(scope="module")
def server(tiny_gguf):
    path = str(tiny_gguf("Q4_1", context_length=CONTEXT))
    reg = Registry([
        ModelEntry(name="tiny", path=path),
        ModelEntry(name="tiny-nocache", path=path, prefix_caching=False),
        ModelEntry(name="tiny-stamped", path=path, emulate=FAST, pace="none"),
    ])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with WaferClient(server.address, timeout=120) as c:
        yield c


def chat(client, model, turns=len(QUESTIONS), n=12):
    """A stateless multi-turn chat: each turn sends the whole conversation. Per turn: the
    answer's token ids and the usage."""
    history, out = [], []
    for q in QUESTIONS[:turns]:
        history.append({"role": "user", "content": q})
        tokens, done = split(list(client.generate(messages=history, model=model, max_tokens=n,
                                                  temperature=0)))
        history.append({"role": "assistant", "content": "".join(t.text for t in tokens)})
        out.append(([t.id for t in tokens], done))
    return out


def test_a_stateless_chat_reuses_each_previous_turn_with_the_same_tokens(client, server):
    cached = chat(client, "tiny")
    plain = chat(client, "tiny-nocache")
    assert [ids for ids, _ in cached] == [ids for ids, _ in plain]
    assert all(d.usage["cached_tokens"] == 0 for _, d in plain)
    for (_, prev), (_, d) in zip(cached, cached[1:]):
        u = d.usage
        # turn N finds turn N-1's conversation: all its full blocks
        assert u["cached_tokens"] >= (prev.usage["prompt_tokens"] // 16 - 1) * 16 > 0
        assert u["prefill_tokens"] == u["prompt_tokens"] - u["cached_tokens"]
    assert wait_until(lambda: kv_used(server) == 0 and kv_used(server, "tiny-nocache") == 0)
    m = scrape(server.metrics_url)
    hits = m['wafer_prefix_cache_hits_total{model_name="tiny"}']
    assert hits == sum(d.usage["cached_tokens"] for _, d in cached)
    assert m['wafer_prefix_cache_queries_total{model_name="tiny"}'] >= hits + len(QUESTIONS)
    assert m['wafer_prefix_cache_blocks{model_name="tiny"}'] > 0
    assert m['wafer_prefix_cache_blocks{model_name="tiny-nocache"}'] == 0
    assert server.runtime("tiny").scheduler.cfg.prefix_caching
    assert not server.runtime("tiny-nocache").scheduler.cfg.prefix_caching


def test_the_emulated_ttft_counts_only_the_tokens_not_cached(client, server):
    (_, d1), (_, d2) = chat(client, "tiny-stamped", turns=2, n=8)
    clock = server.runtime("tiny-stamped").emulator.clock
    for d in (d1, d2):
        u = d.usage
        expected = clock.ttft_us(u["prompt_tokens"], cached_tokens=u["cached_tokens"])
        assert d.emulation["sim_ttft_ms"] == pytest.approx(expected / 1e3)
    assert d2.usage["cached_tokens"] > 0
    assert d2.emulation["sim_ttft_ms"] < clock.ttft_us(d2.usage["prompt_tokens"]) / 1e3


def test_the_server_option_turns_it_off_for_every_model(tiny_gguf):
    path = str(tiny_gguf("Q4_1", context_length=CONTEXT))
    reg = Registry([ModelEntry(name="tiny", path=path)])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None, prefix_caching=False)) as srv:
        with WaferClient(srv.address, timeout=120) as c:
            assert all(d.usage["cached_tokens"] == 0 for _, d in chat(c, "tiny", turns=2, n=4))
        assert not srv.runtime("tiny").scheduler.cfg.prefix_caching


def test_registry_key_prefix_caching():
    reg = Registry.from_dict({"server": {"prefix_caching": False},
                              "models": [{"name": "a", "path": "x", "prefix_caching": False},
                                         {"name": "b", "path": "x"}]})
    a, b = reg.lookup("a"), reg.lookup("b")
    assert not a.prefix_caching and b.prefix_caching and a.engine_key() != b.engine_key()
    assert reg.server["prefix_caching"] is False
    with pytest.raises(RegistryError, match="prefix_caching"):
        Registry.from_dict({"models": [{"name": "a", "path": "x", "prefix_caching": "no"}]})


@pytest.mark.real_model
def test_real_stateless_chat_hits_the_cache_with_the_same_answers(real_model_path):
    reg = Registry([
        ModelEntry(name="smollm2-135m", path=str(real_model_path), max_batch=4, kv_blocks=128),
        ModelEntry(name="plain", path=str(real_model_path), max_batch=4, kv_blocks=128,
                   prefix_caching=False),
    ])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None)) as srv:
        with WaferClient(srv.address, timeout=300) as c:
            cached = chat(c, "smollm2-135m", n=10)
            plain = chat(c, "plain", n=10)
    assert [ids for ids, _ in cached] == [ids for ids, _ in plain]
    assert cached[0][1].usage["cached_tokens"] == 0
    assert all(d.usage["cached_tokens"] > 0 for _, d in cached[1:])
    assert all(d.usage["cached_tokens"] == 0 for _, d in plain)
