"""The load generator core: send prompts on an arrival schedule and/or under a concurrency cap,
collect one RequestRecord per request, and GuideLLM's sweep over rates.

Open loop (``request_rate``): requests start at the arrival process's offsets (arrivals.py)
whatever the server does. Closed loop (``max_concurrency``): at most that many requests are in
flight; the next starts when one ends. Both together: arrivals that find the cap reached wait for
a slot (their time in that queue is not part of their latency, as in vLLM). Synchronous is a cap
of 1. All requests share one gRPC channel (HTTP/2 streams), as an HTTP benchmark shares its
connection pool.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import grpc
import numpy as np

from benches.loadgen.arrivals import arrival_offsets
from benches.loadgen.dataset import Prompt
from benches.loadgen.metrics import RequestRecord
from engine.client import Completion, SessionError, Token


@dataclass
class Run:
    label: str                    # "synchronous", "throughput", "poisson@2.50", "concurrency 4", ...
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    records: list[RequestRecord] = field(default_factory=list)
    duration_s: float = 0.0
    peak_in_flight: int = 0       # most requests the generator had in flight at once

    @property
    def request_throughput(self) -> float:
        return sum(r.success for r in self.records) / self.duration_s if self.duration_s else 0.0


async def collect(stream: AsyncIterator[Token | Completion], rec: RequestRecord) -> RequestRecord:
    """Read a stream of Tokens then a Completion into ``rec`` (whose start_ns is set); a gRPC
    error or a refused session turn is recorded by its status name, never raised."""
    parts = []
    try:
        async for item in stream:
            if isinstance(item, Token):
                rec.token_ns.append(item.received_ns)
                rec.step_ns.append(item.engine_step_ns)
                if item.sim_time_us is not None:
                    rec.sim_time_us.append(item.sim_time_us)
                parts.append(item.text)
            else:
                rec.end_ns = time.monotonic_ns()
                parts.append(item.text)
                rec.finish_reason, rec.usage = item.finish_reason, item.usage
                rec.output_len = item.usage.get("completion_tokens")
                rec.input_len = item.usage.get("prompt_tokens") or rec.input_len
    except grpc.aio.AioRpcError as e:
        rec.error_code, rec.error = e.code().name, e.details() or ""
    except SessionError as e:
        rec.error_code, rec.error = e.code, e.message
    except (ValueError, TypeError) as e:  # refused by the client before sending (a field's range)
        rec.error_code, rec.error = "CLIENT_" + type(e).__name__, str(e)
    rec.end_ns = rec.end_ns or time.monotonic_ns()
    rec.generated_text = "".join(parts)
    return rec


async def send(client, prompt: Prompt, *, model: str = "", coalesce: int = 1,
               timeout: float | None = 600.0, **sampling) -> RequestRecord:
    """One Generate call for a prompt, recorded."""
    rec = RequestRecord(prompt.index, input_len=prompt.input_len)
    rec.start_ns = time.monotonic_ns()
    stream = client.generate(model=model, coalesce=coalesce, timeout=timeout,
                             max_tokens=prompt.max_tokens, **prompt.input, **sampling)
    return await collect(stream, rec)


async def run_load(client, prompts: list[Prompt], *, request_rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0, label: str = "", progress=None,
                   **send_kw) -> Run:
    """Send every prompt once; ``progress`` (a tqdm bar or None) advances per finished request."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency} must be at least 1")
    run = Run(label or default_label(request_rate, burstiness, max_concurrency), request_rate, burstiness,
              max_concurrency)
    offsets = arrival_offsets(len(prompts), request_rate, burstiness, seed)
    cap = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    in_flight = 0

    async def one(p: Prompt) -> RequestRecord:
        nonlocal in_flight
        if cap is not None:
            await cap.acquire()
        in_flight += 1
        run.peak_in_flight = max(run.peak_in_flight, in_flight)
        try:
            return await send(client, p, **send_kw)
        finally:
            in_flight -= 1
            if cap is not None:
                cap.release()
            if progress is not None:
                progress.update(1)

    t0 = time.monotonic()
    tasks = []
    for p, off in zip(prompts, offsets):
        if (delay := t0 + off - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(p)))
    run.records = list(await asyncio.gather(*tasks))
    run.duration_s = time.monotonic() - t0
    return run


def default_label(rate: float, burstiness: float, max_concurrency: int | None) -> str:
    if max_concurrency == 1 and math.isinf(rate):
        return "synchronous"
    parts = []
    if not math.isinf(rate):
        parts.append(f"{'poisson' if burstiness == 1 else f'gamma{burstiness:g}'}@{rate:.2f}")
    if max_concurrency:
        parts.append(f"concurrency {max_concurrency}")
    return ", ".join(parts) or "throughput"


def sweep_rates(sync_rate: float, max_rate: float, size: int) -> list[float]:
    """GuideLLM's sweep: after the synchronous and the throughput runs, size - 2 rates evenly
    spaced strictly between the rate the synchronous run reached and the throughput run's."""
    return [float(r) for r in np.linspace(sync_rate, max_rate, size)[1:-1]] if size > 2 else []


async def sweep(client, prompts_for: Callable[[int], list[Prompt]], size: int, *, burstiness: float = 1.0,
                max_concurrency: int | None = None, seed: int = 0,
                progress_for: Callable[[str, int], object] = lambda label, n: None, **send_kw) -> list[Run]:
    """Synchronous, then throughput (all at once, or under ``max_concurrency``), then rates up to
    saturation in between; ``prompts_for(k)`` gives run k's prompts."""
    if size < 2:
        raise ValueError(f"sweep size {size} must be at least 2 (synchronous and throughput)")
    plan = [dict(max_concurrency=1, label="synchronous"),
            dict(max_concurrency=max_concurrency, label="throughput")]
    runs = []
    for k in range(size):
        if k == 2:
            lo, hi = runs[0].request_throughput, runs[1].request_throughput
            if lo <= 0 or hi <= 0:
                raise RuntimeError("the synchronous or throughput run completed no request: nothing to sweep")
            plan += [dict(request_rate=r, burstiness=burstiness, max_concurrency=max_concurrency)
                     for r in sweep_rates(lo, hi, size)]
        prompts = prompts_for(k)
        bar = progress_for(plan[k].get("label") or default_label(
            plan[k].get("request_rate", math.inf), burstiness, max_concurrency), len(prompts))
        runs.append(await run_load(client, prompts, seed=seed + k, progress=bar, **plan[k], **send_kw))
        if bar is not None:
            bar.close()
    return runs
