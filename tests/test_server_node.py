"""The gRPC server on loopback from a second, independent gRPC stack: Node's grpc-js with the
protos loaded at runtime by proto-loader (tests/node/client.mjs), as a client in another language
would use it. Python's grpc shares its core and our stubs with the server; this one shares nothing,
so it catches what only a foreign client sees: framing, trailers, status details, the encoding of
`optional` zero values and uint64s.

Skipped only when node or npm is not on PATH. The first run installs the pinned packages
(``npm ci``) into tests/node/node_modules; later runs reuse them while package-lock.json is
unchanged (its hash is stamped there)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.client import Token
from fault.faults import assert_invariants, slow_engine, take_baseline
from serving import CONTEXT, client, kv_used, model_path, server, tiny_server, wait_until  # noqa: F401 (fixtures)

NODE_DIR = Path(__file__).parent / "node"
STAMP = NODE_DIR / "node_modules" / ".package-lock.sha256"  # npm ci empties node_modules first
INSTALL_TIMEOUT_S = 300
RUN_TIMEOUT_S = 30  # the client's own watchdog ends it at 25 s
SERVED = ("tiny", "tiny-2024", "tiny-narrow")  # tiny_server's engines, for assert_invariants


@pytest.fixture(scope="module")
def node():
    """The node executable, with tests/node's packages installed."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not on PATH: the grpc-js interoperability test needs Node.js")
    lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if not (STAMP.is_file() and STAMP.read_text() == lock):
        env = dict(os.environ, npm_config_update_notifier="false")
        try:
            r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=NODE_DIR,
                               env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"npm ci did not finish within {INSTALL_TIMEOUT_S} s (is the npm registry reachable?)")
        assert r.returncode == 0, f"npm ci failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        STAMP.write_text(lock)
    return shutil.which("node")


def run_client(node, server, scenario: str) -> dict[str, dict]:
    """Run one scenario of client.mjs; its reports by call name (messages, code, details, trailers)."""
    r = subprocess.run([node, str(NODE_DIR / "client.mjs"), server.address, scenario],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, f"client.mjs {scenario} exited {r.returncode}:\n{r.stderr[-3000:]}"
    reports = [json.loads(line) for line in r.stdout.splitlines()]
    return {rep["call"]: rep for rep in reports}


def of_kind(report: dict, kind: str, turn_id: str | None = None) -> list[dict]:
    return [m[kind] for m in report["messages"]
            if m["kind"] == kind and (turn_id is None or m["turn_id"] == turn_id)]


def token_ids(chunks: list[dict]) -> list[int]:
    return [i for c in chunks for i in c["token_ids"]]


def test_generate_streams_token_chunks_then_one_final(node, server, client):
    """Chunks in order then exactly one Final whose usage counts them; temperature 0 (an
    `optional` field set to its zero value) reaches the server as greedy: the same tokens as the
    Python client's; coalesced chunks carry 5 tokens each."""
    calls = run_client(node, server, "generate")
    model = calls["model"]["messages"][0]
    assert (model["name"], model["is_default"], model["context_length"]) == ("tiny", True, CONTEXT)

    gen = calls["generate"]
    assert gen["code"] == "OK"
    assert [m["kind"] for m in gen["messages"]].count("final") == 1 and gen["messages"][-1]["kind"] == "final"
    chunks, final = of_kind(gen, "chunk"), of_kind(gen, "final")[0]
    ids = token_ids(chunks)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert final["usage"]["completion_tokens"] == len(ids) >= 1
    assert final["usage"]["prompt_tokens"] == len(client.tokenize("hello world"))
    assert final["finish_reason"] in ("length", "stop")
    if final["finish_reason"] == "length":
        assert len(ids) == 24
    assert all(c["engine_step_ns"] > 0 and c["batch_size"] >= 1 for c in chunks)  # uint64 as a number
    assert ids == [t.id for t in client.generate("hello world", max_tokens=24, temperature=0)
                   if isinstance(t, Token)]

    coalesced = calls["coalesced"]
    chunks, final = of_kind(coalesced, "chunk"), of_kind(coalesced, "final")[0]
    sizes = [len(c["token_ids"]) for c in chunks]
    assert sum(sizes) == final["usage"]["completion_tokens"] and all(s == 5 for s in sizes[:-1])
    assert token_ids(chunks) == ids[:23]
    assert wait_until(lambda: kv_used(server) == 0)


def test_session_keeps_its_kv_between_turns_then_closes(node, server):
    """Two chat turns on one stream: each gets its Final, the second reuses the first's KV; after
    CloseSession the server says `closed` and ends the stream with OK by itself (the client never
    half-closes), freeing the KV."""
    s = run_client(node, server, "session")["session"]
    assert s["code"] == "OK", s["details"]
    first, last = s["messages"][0], s["messages"][-1]
    assert first["kind"] == "opened" and first["opened"]["session_id"] and first["opened"]["model"] == "tiny"
    finals = {m["turn_id"]: m["final"] for m in s["messages"] if m["kind"] == "final"}
    assert list(finals) == ["t1", "t2"]
    for tid, final in finals.items():
        assert final["finish_reason"] in ("length", "stop")
        assert final["usage"]["completion_tokens"] == len(token_ids(of_kind(s, "chunk", tid))) >= 1
    u1, u2 = finals["t1"]["usage"], finals["t2"]["usage"]
    assert u1["cached_tokens"] == 0 and u2["cached_tokens"] > 0
    assert u2["prompt_tokens"] > u1["prompt_tokens"] + u1["completion_tokens"]  # the whole conversation
    assert u2["prefill_tokens"] == u2["prompt_tokens"] - u2["cached_tokens"] < u1["prompt_tokens"]
    assert (last["kind"], last["closed"]["reason"], last["turn_id"]) == ("closed", "client", "t2")
    assert wait_until(lambda: kv_used(server) == 0)


def test_out_of_range_fields_are_refused_naming_the_field(node, server):
    """A hostile field gets INVALID_ARGUMENT whose details name it and its limit, never a clamp;
    in a session it is a TurnError and the session goes on."""
    calls = run_client(node, server, "invalid")
    for call, named in (("temperature", "temperature=150 must be in [0, 100]"),
                        ("max_tokens", f"max_tokens=100000 exceeds the model's context of {CONTEXT}")):
        assert (calls[call]["code"], calls[call]["messages"]) == ("INVALID_ARGUMENT", [])
        assert named in calls[call]["details"]
    assert calls["unknown_model"]["code"] == "NOT_FOUND"
    assert "no-such-model" in calls["unknown_model"]["details"]

    s = calls["session_turn"]
    assert s["code"] == "OK", s["details"]
    errors = [(m["turn_id"], m["error"]["code"]) for m in s["messages"] if m["kind"] == "error"]
    assert errors == [("bad", "INVALID_ARGUMENT")]
    assert "top_p=2" in of_kind(s, "error")[0]["message"]
    assert [m["turn_id"] for m in s["messages"] if m["kind"] == "final"] == ["good"]
    assert s["messages"][-1]["kind"] == "closed"


def test_lifecycle_trailing_metadata(node, server):
    """A deprecated model is served with its wafer-* trailers; a retired one is refused
    (FAILED_PRECONDITION) with trailers naming its successor."""
    calls = run_client(node, server, "lifecycle")
    dep = calls["deprecated"]
    assert dep["code"] == "OK" and dep["messages"][-1]["kind"] == "final"
    assert {k: dep["trailers"].get(k) for k in ("wafer-deprecated", "wafer-sunset", "wafer-successor")} == \
        {"wafer-deprecated": "true", "wafer-sunset": "2099-12-31", "wafer-successor": "tiny"}
    ret = calls["retired"]
    assert (ret["code"], ret["messages"]) == ("FAILED_PRECONDITION", [])
    assert (ret["trailers"].get("wafer-retired"), ret["trailers"].get("wafer-successor")) == ("true", "tiny")


def test_deadline_and_cancel_end_the_call_and_leave_nothing_behind(node, server):
    """A 150 ms deadline on a long generation ends it with DEADLINE_EXCEEDED; a Generate and a
    Session cancelled by the client after 3 chunks see CANCELLED. None gets a Final, and the
    server is back to its baseline (tests/fault's invariants: KV, queues, sessions, streams)."""
    baseline = take_baseline(server, SERVED)
    with slow_engine(server, "tiny", decode_s=0.002):  # ~2 s of decode: the deadline always comes first
        calls = run_client(node, server, "abort")
    for call, code in (("deadline", "DEADLINE_EXCEEDED"), ("cancel_generate", "CANCELLED"),
                       ("cancel_session", "CANCELLED")):
        assert calls[call]["code"] == code, (call, calls[call]["details"])
        assert not of_kind(calls[call], "final"), call
    assert len(of_kind(calls["cancel_generate"], "chunk")) >= 3
    assert len(of_kind(calls["cancel_session"], "chunk")) >= 3
    assert calls["deadline"]["ms"] < 2000
    assert_invariants(server, baseline)


def test_health_check_says_serving(node, server):
    """grpc.health.v1 from a foreign stack: the Wafer service and the server as a whole."""
    calls = run_client(node, server, "health")
    assert [calls[c]["messages"][0]["status"] for c in ("health", "health_server")] == ["SERVING", "SERVING"]
