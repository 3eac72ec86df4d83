"""Operating the gRPC server: models and their lifecycle, Tokenize, reflection, metrics, health,
drain, thread priorities, busy ports."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.server.app import ServerOptions
from engine.client import WaferClient
from engine.server.registry import ModelEntry, Registry
from engine.server.testing import ServerThread
from protos import wafer_pb2 as pb
from serving import CONTEXT, client, model_path, scrape, server, split, wait_until  # noqa: F401 (fixtures)

def test_calls_without_ids_are_named_in_the_log(client, caplog):
    caplog.set_level(logging.DEBUG, logger="engine.scheduler")
    list(client.generate("log me", max_tokens=2, temperature=0))
    with client.session() as s:
        list(s.turn("and me", turn_id="t-7", max_tokens=2, temperature=0))
    finished = [r.getMessage() for r in caplog.records if "finished" in r.getMessage()]
    assert any(re.match(r"request 'g\d+' ", m) for m in finished), finished
    assert any(re.match(r"request 's\d+/t-7' ", m) for m in finished), finished


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
    assert (t.numerics, t.int8_kernel) == ("exact", "") and models["tiny-2020"].numerics == ""


def test_a_model_served_in_fast_numerics_says_so_and_streams_the_local_tokens(model_path):
    """The server's --numerics reaches the model (a registry entry's own key wins); ModelInfo
    names the mode and the integer kernel, and the stream is the one a local fast model makes."""
    from engine.generate import Generation
    from engine.model import Model
    from engine.sampling import SamplingParams

    registry = Registry([ModelEntry(name="tiny", path=str(model_path)),
                         ModelEntry(name="tiny-exact", path=str(model_path), numerics="exact")], default="tiny")
    with ServerThread(registry, ServerOptions(port=0, metrics_port=None, numerics="fast")) as srv:
        with WaferClient(srv.address) as c:
            info = {m.name: m for m in c.list_models()}
            assert info["tiny"].numerics == "fast" and info["tiny"].int8_kernel in ("vnni", "portable")
            assert info["tiny-exact"].numerics == "exact" and info["tiny-exact"].int8_kernel == ""
            got = [t.id for t in split(list(c.generate(token_ids=[1, 2, 3], max_tokens=8, temperature=0)))[0]]
    local = Model(model_path, max_batch=1, numerics="fast")
    want = [t.id for t in Generation(local, [1, 2, 3], SamplingParams(temperature=0, max_tokens=8))]
    assert got == want


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


def test_metrics_move(client, server):
    before = scrape(server.metrics_url)
    client.complete("metrics please", max_tokens=6, temperature=0)
    after = scrape(server.metrics_url)
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
    errors = {k: v for k, v in scrape(server.metrics_url).items() if k.startswith("wafer_request_errors_total")}
    assert errors['wafer_request_errors_total{code="NOT_FOUND",model_name="unknown"}'] >= 2
    assert not any("nope" in k or "passwd" in k for k in errors)
    # calls that end before their final - a deadline, a client that stops reading - are counted
    key = 'wafer_request_errors_total{code="%s",model_name="tiny"}'
    grew = lambda code: scrape(server.metrics_url).get(key % code, 0) > before.get(key % code, 0)  # noqa
    for _ in range(3):  # the client's timer usually ends the call first: still a deadline
        before = scrape(server.metrics_url)
        with pytest.raises(grpc.RpcError) as e:  # (the tiny model makes ~1000 tokens in 0.15 s)
            list(client.generate("slow", max_tokens=CONTEXT - 10, temperature=0, timeout=0.05))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: grew("DEADLINE_EXCEEDED")), {
            k: v for k, v in scrape(server.metrics_url).items() if "errors" in k}
        assert not grew("CANCELLED")
    before = scrape(server.metrics_url)
    for _ in client.generate("left", max_tokens=CONTEXT // 2, temperature=0):
        break
    assert wait_until(lambda: grew("CANCELLED"))
    assert not grew("DEADLINE_EXCEEDED")


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
        decode, calls, slept = model.decode, [], []

        def slow_decode(*args):
            calls.append(len(args[0]))
            if len(calls) == 3 and not slept:  # a decode step of the streams: the drain finds it running
                slept.append(True)
                time.sleep(3.5)  # past the 2.5 s the drain used to wait
            return decode(*args)

        async def stream(c, i):
            items = [x async for x in c.generate(f"stream {i}", max_tokens=500, temperature=0)]
            return items[-1].finish_reason

        async def main():
            async with AsyncWaferClient(srv.address, timeout=60) as c:
                model.decode = slow_decode  # before the streams: a fast engine finishes them in 0.3 s
                tasks = [asyncio.ensure_future(stream(c, i)) for i in range(4)]
                deadline = time.monotonic() + 60
                while not slept and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert slept, f"no third decode step in 60 s ({len(calls)} calls)"
                await asyncio.to_thread(srv.drain, 0.0, 60)
                return await asyncio.gather(*tasks)

        assert asyncio.run(main()) == ["shutdown"] * 4


def _status_or_none(check):
    try:
        return check()
    except grpc.RpcError:
        return None


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
        assert nice(rt.engine_thread.native_id) == base + 3
        assert nice(rt.publisher.native_id) == base
        assert nice(srv.thread.native_id) == base
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
        engine = rt.engine_thread.native_id
        assert os.sched_getscheduler(engine) == os.SCHED_IDLE
        assert os.sched_getscheduler(rt.publisher.native_id) == os.SCHED_OTHER
        assert os.sched_getscheduler(srv.thread.native_id) == os.SCHED_OTHER
        with WaferClient(srv.address, timeout=60) as c:  # a prompt past 64 tokens: a step on every thread
            assert c.complete("hi " * 100, max_tokens=3, temperature=0)[1].usage["completion_tokens"] == 3
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
        assert policy(srv.thread.native_id) == expected
        assert policy(rt.publisher.native_id) == expected
        assert policy(rt.engine_thread.native_id) == os.SCHED_OTHER
        with WaferClient(srv.address, timeout=60) as c:
            assert c.complete("hi", max_tokens=3, temperature=0)[1].usage["completion_tokens"] == 3


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
        gate.set()  # the load completes; the engine thread is then never started
        assert wait_until(lambda: rt.loaded.is_set(), 60)
        assert rt.error is None and rt.engine_thread is None
    finally:
        gate.set()
        srv.stop()
