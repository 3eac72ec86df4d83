"""The raw floor for the serving benches: a bare grpc.aio server that streams GenerateResponse
messages of the same shape as `wafer serve`, with no model, no scheduler, no validation.

A stand-in "engine" thread ticks every ``--step-ms`` (time.sleep), and on each tick hands one
token to every open stream through ``loop.call_soon_threadsafe`` into per-stream queues - the
minimum any design with an engine thread must do. Each chunk reports the tick's measured duration
in ``engine_step_ns``, so ``client ITL - engine_step_ns`` is the floor's per-token overhead, the
same formula the bench applies to the real server.

With ``--busy`` the stand-in engine keeps every core busy for each tick instead of sleeping: it
runs short Numba parallel regions (nogil, one chunk per thread) back to back from Python until
the tick is over, at the niceness of `wafer serve`'s compute threads - the shape of the CPU load
a decode step puts on the machine, so the streaming threads compete for cores as they do in the
real server. That floor tells which part of the real server's overhead is the machine's.

    python benches/serving_floor.py --port 0 --ready-file /tmp/floor --step-ms 10 [--busy]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from protos import wafer_pb2 as pb  # noqa: E402
from protos import wafer_pb2_grpc as pb_grpc  # noqa: E402


REGION_S = 40e-6  # about a decode step's parallel regions: ~250 of them in 10 ms


class CpuLoad:
    """Burns every Numba thread for a given time in REGION_S-long parallel regions."""

    def __init__(self, nice: int):
        import numba

        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)  # Numba's threads inherit it

        @numba.njit(nogil=True, parallel=True)
        def spin(iters):
            out = np.zeros(numba.get_num_threads())
            for t in numba.prange(out.size):
                x = 1.0
                for _ in range(iters):
                    x = x * 0.999999 + 1e-9
                out[t] = x
            return out

        self.spin = spin
        spin(1000)
        t0 = time.perf_counter()
        spin(1_000_000)
        self.iters = max(1, int(1_000_000 * REGION_S / (time.perf_counter() - t0)))

    def run(self, seconds: float, hand_over) -> None:
        """Burn for ``seconds`` from now; ``hand_over`` runs first, inside the timed tick."""
        end = time.perf_counter() + seconds
        hand_over()
        while time.perf_counter() < end:
            self.spin(self.iters)


class FakeEngine:
    def __init__(self, step_s: float, prefill_s: float, busy_nice: int | None = None):
        self.step_s = step_s
        self.prefill_s = prefill_s
        self.busy_nice = busy_nice
        self.streams: dict[int, tuple] = {}  # id -> (loop, queue, remaining, index)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.ready = threading.Event()
        self.outbox: dict = {}  # loop -> [(queue, item)] not yet handed over
        threading.Thread(target=self.run, daemon=True).start()
        self.ready.wait()  # the busy ticks' kernel is compiled before the server says it is ready

    def add(self, key, loop, q, n):
        with self.lock:
            self.streams[key] = [loop, q, n, 0, True]
        self.wake.set()

    def remove(self, key):
        with self.lock:
            self.streams.pop(key, None)

    def hand_over(self):
        outbox, self.outbox = self.outbox, {}
        for loop, items in outbox.items():
            loop.call_soon_threadsafe(_deliver, items)

    def run(self):
        # Sleeping ticks hand each tick's tokens over right after it. A busy tick hands the
        # previous tick's over inside its own timed part, as wafer serve hands a step's tokens over
        # as the next model call starts: the engine's wait for the GIL the event loop takes then
        # is not added between ticks, where it would count as per-token overhead.
        load = CpuLoad(self.busy_nice) if self.busy_nice is not None else None
        self.ready.set()
        while True:
            if not self.streams:
                self.hand_over()
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            with self.lock:
                new = any(s[4] for s in self.streams.values())
            t0 = time.monotonic_ns()
            if load:
                load.run(self.prefill_s if new else self.step_s, self.hand_over)
            else:
                time.sleep(self.prefill_s if new else self.step_s)
            dt = time.monotonic_ns() - t0
            with self.lock:
                for key, s in list(self.streams.items()):
                    loop, q, remaining, index, _ = s
                    s[4] = False
                    self.outbox.setdefault(loop, []).append((q, (index, dt, remaining == 1)))
                    s[2] -= 1
                    s[3] += 1
                    if s[2] == 0:
                        del self.streams[key]
            if not load:
                self.hand_over()


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
    engine = FakeEngine(args.step_ms / 1e3, args.prefill_ms / 1e3, args.nice if args.busy else None)
    pb_grpc.add_WaferServicer_to_server(FloorServicer(engine), server)
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
    p.add_argument("--busy", action="store_true", help="keep every core busy during each tick")
    p.add_argument("--nice", type=int, default=5, help="niceness of the busy ticks (wafer serve's default)")
    args = p.parse_args()
    if args.prefill_ms is None:
        args.prefill_ms = args.step_ms
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
