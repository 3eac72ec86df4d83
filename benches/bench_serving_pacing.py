"""Pacing accuracy of `wafer serve --emulate ... --pace realtime` (report, never assert).

A tiny synthetic model (fast enough to keep up) is served as two emulated targets; clients stream
64 tokens and compare the gaps they observe with the simulated gaps carried in the stream:

    gap error_i = (r_i - r_{i-1}) - (sim_i - sim_{i-1})       for i >= 1
    TTFT error  = (r_0 - request sent) - sim_0

p50 error and p99 jitter (p99 of |gap error|), at 1 and 4 concurrent streams.

    .venv/bin/python -m pytest -q benches/bench_serving_pacing.py --benchmark-only -s
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benches"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_serving import start, stop  # noqa: E402

TARGETS = {"paced-405b": "wse3:llama-3.1-405b", "paced-70b": "wse3:llama-3.1-70b"}


@pytest.fixture(scope="module")
def paced_server():
    from synthetic import write_tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="wafer-pacing-"))
    model = write_tiny_llama(tmp / "tiny.gguf", context_length=1024)
    lines = []
    for name, target in TARGETS.items():
        lines += ["[[models]]", f'name = "{name}"', f'path = "{model}"', f'emulate = "{target}"',
                  'pace = "realtime"', ""]
    (tmp / "registry.toml").write_text("\n".join(lines))
    proc, address = start([sys.executable, "-m", "engine.cli", "serve", "--config", str(tmp / "registry.toml"),
                           "--port", "0", "--metrics-port", "-1"])
    yield address
    stop(proc)


async def _stream(stub, model: str, i: int, n: int):
    req = pb.GenerateRequest(model=model, text=f"pacing stream {i}",
                             sampling=pb.SamplingParams(temperature=0, max_tokens=n))
    t0 = time.monotonic_ns()
    recv, sim, late = [], [], []
    async for resp in stub.Generate(req, timeout=120):
        if resp.HasField("chunk"):
            now = time.monotonic_ns()
            recv.extend([now] * len(resp.chunk.token_ids))
            sim.extend(resp.chunk.sim_time_us)
            late.extend(resp.chunk.late_us)
    return t0, np.array(recv) / 1e3, np.array(sim, float), np.array(late, float)


async def _run(address, model, streams, n):
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.WaferStub(ch)
        await _stream(stub, model, 0, 2)
        return await asyncio.gather(*[_stream(stub, model, i, n) for i in range(streams)])


@pytest.mark.parametrize("model", list(TARGETS))
@pytest.mark.parametrize("streams", [1, 4])
def test_pacing_accuracy(benchmark, paced_server, model, streams):
    info = {}

    def measure():
        res = asyncio.run(_run(paced_server, model, streams, 64))
        gap_err, ttft_err, sim_gap, late = [], [], [], []
        for t0, r, s, lt in res:
            if len(r) < 2:
                continue
            ttft_err.append(r[0] - t0 / 1e3 - s[0])
            gap_err.extend((np.diff(r) - np.diff(s)).tolist())
            sim_gap.extend(np.diff(s).tolist())
            late.extend(lt.tolist())
        g = np.array(gap_err)
        info.update(target=TARGETS[model], streams=streams, sim_gap_us_p50=float(np.median(sim_gap)),
                    gap_err_us_p50=float(np.median(g)), gap_jitter_us_p99=float(np.percentile(np.abs(g), 99)),
                    ttft_err_us_p50=float(np.median(ttft_err)), late_tokens=int(np.sum(np.array(late) > 1000)),
                    tokens=len(late))

    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    print(f"\npacing {info['target']} x{streams}: simulated gap p50 {info['sim_gap_us_p50']:.0f} us; "
          f"gap error p50 {info['gap_err_us_p50']:+.0f} us, p99 jitter {info['gap_jitter_us_p99']:.0f} us; "
          f"TTFT error p50 {info['ttft_err_us_p50']:+.0f} us; "
          f"{info['late_tokens']}/{info['tokens']} tokens late by > 1 ms")
