"""SIGTERM to a `wafer serve` process with live streams: every Generate stream and every session
turn gets its final (or a status), idle sessions are closed "shutdown", and the process exits 0
without a traceback."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from faults import channel, gen_request, generate, run, stub_of, until
from protos import wafer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def start_server(path, tmp, *flags):
    ready, log = tmp / "ready", tmp / "serve.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--model", str(path), "--port", "0",
             "--metrics-port", "0", "--ready-file", str(ready), *flags],
            cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists() or not ready.read_text().strip():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "server not ready in 120 s"
        time.sleep(0.05)
    return proc, f"127.0.0.1:{int(ready.read_text().split()[0])}", log


def test_sigterm_with_live_streams_and_sessions(fault_model, tmp_path):
    proc, address, log = start_server(fault_model, tmp_path, "--grace", "0.3", "--max-queue-ms", "60000")
    try:
        started = set()  # the streams that have their first token (or an idle session its final)

        async def session(busy: bool, k: int):
            q: asyncio.Queue = asyncio.Queue()

            async def reqs():
                while (m := await q.get()) is not None:
                    yield m

            q.put_nowait(pb.SessionRequest(open=pb.SessionOpen()))
            q.put_nowait(pb.SessionRequest(turn=pb.Turn(turn_id="t0", text="hi", sampling=pb.SamplingParams(
                max_tokens=2 if not busy else 2000, temperature=0))))
            got = []
            async with channel(address) as ch:
                try:
                    async for r in stub_of(ch).Session(reqs(), timeout=60):
                        got.append(r)
                        if (r.HasField("chunk") and busy) or (r.HasField("final") and not busy):
                            started.add(("session", k))
                except grpc.aio.AioRpcError as e:
                    got.append(e.code())
                finally:
                    q.put_nowait(None)
            return got

        async def main():
            async with channel(address) as ch:
                stub = stub_of(ch)
                gens = [asyncio.ensure_future(generate(stub, gen_request("", max_tokens=2000), timeout=60,
                                                       on_token=lambda o, k=k: started.add(("gen", k))))
                        for k in range(12)]
                sess = [asyncio.ensure_future(session(i < 3, i)) for i in range(4)]
                assert await until(lambda: len(started) == 16, timeout=30), len(started)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*gens), await asyncio.gather(*sess)

        gens, sessions = run(main(), timeout=90)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "Traceback" not in text and "draining" in text and "stopped" in text
    for o in gens:  # each a final (the drain's "shutdown", or done before it) or a status
        assert o.reason in ("shutdown", "length", "stop") or o.code == grpc.StatusCode.UNAVAILABLE, o
    assert sum(o.reason == "shutdown" for o in gens) >= 6
    for got in sessions:
        finals = [r for r in got if isinstance(r, pb.SessionResponse) and r.HasField("final")]
        closed = [r for r in got if isinstance(r, pb.SessionResponse) and r.HasField("closed")]
        assert finals, got  # the running turn's final (or the finished one's)
        assert closed and closed[-1].closed.reason == "shutdown", got
