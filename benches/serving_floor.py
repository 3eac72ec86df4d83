"""The raw floor for the serving benches: a bare grpc.aio server that streams GenerateResponse
messages of the same shape as `wafer serve`, with no model, no scheduler, no validation.

A stand-in "engine" thread ticks every ``--step-ms`` (time.sleep), and on each tick hands one
token to every open stream through ``loop.call_soon_threadsafe`` into per-stream queues - the
minimum any design with an engine thread must do. Each chunk reports the tick's measured duration
in ``engine_step_ns``, so ``client ITL - engine_step_ns`` is the floor's per-token overhead, the
same formula the bench applies to the real server.

    python benches/serving_floor.py --port 0 --ready-file /tmp/floor --step-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402

from protos import wafer_pb2 as pb  # noqa: E402
from protos import wafer_pb2_grpc as pb_grpc  # noqa: E402


class FakeEngine:
    def __init__(self, step_s: float, prefill_s: float):
        self.step_s = step_s
        self.prefill_s = prefill_s
        self.streams: dict[int, tuple] = {}  # id -> (loop, queue, remaining, index)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def add(self, key, loop, q, n):
        with self.lock:
            self.streams[key] = [loop, q, n, 0, True]
        self.wake.set()

    def remove(self, key):
        with self.lock:
            self.streams.pop(key, None)

    def run(self):
        while True:
            if not self.streams:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            with self.lock:
                new = any(s[4] for s in self.streams.values())
            t0 = time.monotonic_ns()
            time.sleep(self.prefill_s if new else self.step_s)
            dt = time.monotonic_ns() - t0
            by_loop = {}
            with self.lock:
                for key, s in list(self.streams.items()):
                    loop, q, remaining, index, _ = s
                    s[4] = False
                    by_loop.setdefault(loop, []).append((q, (index, dt, remaining == 1)))
                    s[2] -= 1
                    s[3] += 1
                    if s[2] == 0:
                        del self.streams[key]
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items):
    for q, item in items:
        q.put_nowait(item)


class FloorServicer(pb_grpc.WaferServicer):
    def __init__(self, engine: FakeEngine):
        self.engine = engine

    async def Generate(self, request, context):
        t0 = time.monotonic_ns()  # usage.ttft_ms runs from here, as in the real servicer
        q: asyncio.Queue = asyncio.Queue()
        key = id(q)
        n = request.sampling.max_tokens or 16
        self.engine.add(key, asyncio.get_running_loop(), q, n)
        first = last = 0
        try:
            while True:
                index, dt, done = await q.get()
                now = time.monotonic_ns()
                first = first or now
                last = now
                yield pb.GenerateResponse(chunk=pb.TokenChunk(
                    token_ids=[1000 + index % 1000], text=" tok", index=index, engine_step_ns=dt,
                    batch_size=1))
                if done:
                    break
            yield pb.GenerateResponse(final=pb.Final(finish_reason="length", usage=pb.Usage(
                completion_tokens=n, ttft_ms=(first - t0) / 1e6,
                mean_itl_ms=(last - first) / 1e6 / max(1, n - 1))))
        finally:
            self.engine.remove(key)


async def main_async(args) -> None:
    server = grpc.aio.server()
    pb_grpc.add_WaferServicer_to_server(FloorServicer(FakeEngine(args.step_ms / 1e3, args.prefill_ms / 1e3)),
                                        server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    if args.ready_file:
        Path(args.ready_file).write_text(f"{port}\n")
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--step-ms", type=float, default=10.0)
    p.add_argument("--prefill-ms", type=float, default=None)
    p.add_argument("--ready-file")
    args = p.parse_args()
    if args.prefill_ms is None:
        args.prefill_ms = args.step_ms
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
