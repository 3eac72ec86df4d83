"""Emulation in the server: tokens carry their simulated wafer departure times; with pace
realtime none leaves before its time; an engine slower than the wafer says how late it is."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from engine.server.app import ServerOptions
from engine.client import Completion, Token, WaferClient
from engine.server.registry import ModelEntry, Registry
from engine.server.testing import ServerThread
from sim.clock import WaferClock

SLOW = "wse3:llama-3.1-405b"   # ~5.6 ms per token: the tiny model keeps up
FAST = "wse3:smollm2-135m"     # ~0.2 ms per token, ~0.5 ms TTFT: nothing on this CPU keeps up


@pytest.fixture(scope="module")
def server(tiny_gguf):
    path = str(tiny_gguf("Q4_1", context_length=1024))
    reg = Registry([
        ModelEntry(name="tiny", path=path),
        ModelEntry(name="tiny-paced", path=path, emulate=SLOW, pace="realtime"),
        ModelEntry(name="tiny-stamped", path=path, emulate=FAST, pace="none"),
    ])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with WaferClient(server.address, timeout=120) as c:
        yield c


def run(client, model, n):
    t0 = time.monotonic_ns()
    items = list(client.generate("pace me", model=model, max_tokens=n, temperature=0))
    return t0, [i for i in items if isinstance(i, Token)], items[-1]


def test_realtime_pacing_follows_the_simulated_schedule(client, server):
    t0, tokens, done = run(client, "tiny-paced", 24)
    assert isinstance(done, Completion)
    n, prompt = len(tokens), done.usage["prompt_tokens"]
    expected = server.runtime("tiny-paced").emulator.clock.departure_times_us(prompt, n)
    sim = [t.sim_time_us for t in tokens]
    assert sim == [round(x) for x in expected]
    # never released before its simulated time (measured from the request's arrival)
    for t in tokens:
        assert (t.received_ns - t0) / 1e3 >= t.sim_time_us
    assert all(t.late_us is not None for t in tokens)
    e = done.emulation
    assert e["target"] == SLOW and e["pace"] == "realtime"
    assert e["sim_ttft_ms"] == pytest.approx(expected[0] / 1e3)
    assert e["sim_e2e_ms"] == pytest.approx(expected[-1] / 1e3)


def test_engine_behind_the_wafer_reports_lateness(client):
    _, tokens, done = run(client, "tiny-stamped", 16)
    assert all(t.sim_time_us is not None for t in tokens)
    e = done.emulation
    assert e["pace"] == "none" and e["target"] == FAST
    # the first token cannot beat a 0.5 ms simulated TTFT through gRPC + prefill on a CPU
    assert tokens[0].late_us > 0
    assert e["max_late_ms"] > 0 and e["late_tokens"] >= 1
    assert e["final_lag_ms"] == pytest.approx(tokens[-1].late_us / 1e3)


def test_a_coalesced_chunk_is_late_by_its_last_tokens_time(client):
    """A chunk of 4 is held until its last token is due; its earlier tokens are not counted late
    for the wait the client asked for (each token of a chunk carries the chunk's lateness)."""
    items = list(client.generate("pace me", model="tiny-paced", max_tokens=12, temperature=0,
                                 coalesce=4))
    tokens = [i for i in items if isinstance(i, Token)]
    chunks: dict[int, list[Token]] = {}
    for t in tokens:
        chunks.setdefault(t.received_ns, []).append(t)
    assert [len(c) for c in chunks.values()] == [4, 4, 4]
    for chunk in chunks.values():
        assert len({t.late_us for t in chunk}) == 1, [t.late_us for t in chunk]
        # held, never released before its last token's time
        assert chunk[0].sim_time_us < chunk[-1].sim_time_us
    e = items[-1].emulation
    assert e["max_late_ms"] == pytest.approx(max(t.late_us for t in tokens) / 1e3)


def test_unemulated_model_carries_no_sim_times(client):
    _, tokens, done = run(client, "tiny", 4)
    assert all(t.sim_time_us is None and t.late_us is None for t in tokens)
    assert done.emulation is None


def test_model_info_shows_emulation(client):
    info = {m.name: m for m in client.list_models()}
    assert info["tiny-paced"].emulate == SLOW and info["tiny"].emulate == ""


def test_the_simulated_wafers_hold_the_engines_kv_pool(server):
    """The emulated deployment is sized for the KV the engine can hold at once (as `wafer sim
    run --sequences S --context C` for the same numbers), not for one sequence."""
    rt = server.runtime("tiny-stamped")
    clock = rt.emulator.clock
    assert clock.max_sequences > 1 and clock.max_sequences * clock.context >= rt.kv_tokens
    assert clock.plan.kv_capacity_tokens >= rt.kv_tokens
    reference = WaferClock.from_spec(FAST, max_sequences=clock.max_sequences)
    assert clock.itl_us(100, 3) == reference.itl_us(100, 3)


def test_a_first_token_is_timed_with_the_sequences_already_in_flight(client, server):
    """A request that joins a running stream shares the wafer with it from its first token on."""
    clock = server.runtime("tiny-stamped").emulator.clock
    long_run = client.generate("keep going", model="tiny-stamped", max_tokens=900, temperature=0)
    next(long_run)  # the long stream is decoding
    try:
        items = list(client.generate("join", model="tiny-stamped", max_tokens=2, temperature=0))
    finally:
        long_run.close()
    tokens, done = [i for i in items if isinstance(i, Token)], items[-1]
    assert tokens[0].batch_size == 1  # a token from prefill
    assert tokens[0].sim_time_us == round(clock.ttft_us(done.usage["prompt_tokens"], sequences_in_flight=2))
    assert tokens[0].sim_time_us != round(clock.ttft_us(done.usage["prompt_tokens"]))


def test_generate_cli_json_carries_the_simulated_times(server):
    """`wafer generate --server --json` against an emulating model: each token line has its
    simulated time and lateness, the summary the emulation block."""
    out = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--server", server.address,
                          "--model", "tiny-stamped", "--prompt", "hi", "--max-tokens", "3", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    tokens, summary = lines[:-1], lines[-1]
    assert len(tokens) == 3 and all(t["sim_time_us"] > 0 and t["late_us"] >= 0 for t in tokens)
    assert summary["emulation"]["target"] == FAST and summary["emulation"]["pace"] == "none"
