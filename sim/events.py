"""Discrete-event mode: many requests sharing one wafer pipeline.

The pipeline is the abstraction of sim/timing.py: a token occupies the pipeline's slowest
region for its occupancy time (this is what limits how often tokens can enter), and reaches the
end after its latency. A sequence's next decode token becomes ready when its previous token
leaves the wafer (autoregressive); prompt tokens stream, the next one ready as soon as the
previous one has entered. Ready tokens enter first come, first served, so sequences take turns.

For speed, a prompt streams in chunks of `prefill_chunk` tokens (one entry whose occupancy is
the sum of its tokens'); the last prompt token is always its own entry. With one request the
result equals the analytic `TimingModel.departure_cycles` exactly, chunking or not.
"""

from __future__ import annotations

import csv
import heapq
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.timing import TimingModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    arrival_us: float
    prompt: int
    output: int

    def __post_init__(self) -> None:
        if self.prompt < 1 or self.output < 1 or not 0 <= self.arrival_us < math.inf:
            raise ValueError(f"request {self}: prompt and output must be >= 1, arrival finite and >= 0")


@dataclass
class RequestResult:
    request: Request
    departures_us: list[float] = field(default_factory=list)  # from the trace start, like arrival_us

    @property
    def ttft_us(self) -> float:
        """A duration: arrival to the first departure."""
        return self.departures_us[0] - self.request.arrival_us

    @property
    def itls_us(self) -> list[float]:
        d = self.departures_us
        return [b - a for a, b in zip(d, d[1:])]


def simulate(tm: TimingModel, requests: list[Request], prefill_chunk: int = 32,
             max_in_flight: int | None = None) -> list[RequestResult]:
    """Every token's departure time for `requests` (results in the order given). At most
    `max_in_flight` sequences hold KV at once (default: the plan's batch); later arrivals queue
    until one finishes."""
    limit = tm.plan.batch if max_in_flight is None else max_in_flight
    for name, v in (("prefill_chunk", prefill_chunk), ("max_in_flight", limit)):
        if v < 1:
            raise ValueError(f"{name}={v} must be >= 1")
    cyc_per_us = tm.hw.clock_hz / 1e6
    n = len(requests)
    entries: list[list[tuple[int, int | None]]] = []  # per request: (occupancy, latency or None)
    for r in requests:
        entries.append(_entries(tm, r, prefill_chunk))
    pos = [0] * n
    deps: list[list[int]] = [[] for _ in range(n)]
    heap = [(int(round(r.arrival_us * cyc_per_us)), i) for i, r in enumerate(requests)]
    heapq.heapify(heap)
    free, active, waiting, admitted = 0, 0, deque(), set()
    pop, replace = heapq.heappop, heapq.heapreplace  # replace = pop + push in one sift
    while heap:
        ready, i = heap[0]
        k = pos[i]
        if k == 0 and i not in admitted:
            if active >= limit:
                waiting.append(i)
                pop(heap)
                continue
            admitted.add(i)
            active += 1
        occ, lat = entries[i][k]
        start = ready if ready > free else free
        free = start + occ
        pos[i] = k + 1
        if lat is None:  # a prompt chunk: the next one may enter once this one has
            replace(heap, (free, i))
            continue
        dep = start + lat
        deps[i].append(dep)
        if k + 1 < len(entries[i]):
            replace(heap, (dep, i))
            continue
        active -= 1
        if waiting:  # the freed KV slot goes to the longest-waiting arrival
            j = waiting.popleft()
            admitted.add(j)
            active += 1
            replace(heap, (dep, j))
        else:
            pop(heap)
    return [RequestResult(r, [c / cyc_per_us for c in d]) for r, d in zip(requests, deps)]


def _entries(tm: TimingModel, r: Request, chunk: int) -> list[tuple[int, int | None]]:
    """Pipeline entries of one request: prompt chunks (occupancy only), the last prompt token,
    then one entry per further output token (occupancy, latency to departure)."""
    out: list[tuple[int, int | None]] = []
    pos = np.arange(1, r.prompt, dtype=np.int64)  # earlier prompt tokens attend over 1..prompt-1
    if pos.size:
        occ = tm.bottleneck_cycles_array(pos, prefill=True)
        sums = np.add.reduceat(occ, np.arange(0, occ.size, chunk))
        out.extend((int(s), None) for s in sums)
    out.append((tm.bottleneck_cycles(r.prompt), tm.last_prompt_token_cycles(r.prompt)))
    if r.output > 1:
        t = np.arange(r.prompt + 1, r.prompt + r.output, dtype=np.int64)
        occ = tm.bottleneck_cycles_array(t).tolist()
        lat = tm.token_cycles_array(t).tolist()
        out.extend(zip(occ, lat))
    return out


# --- traces ----------------------------------------------------------------------------------

def poisson_trace(n: int, rate_per_s: float, prompt: int | tuple[int, int], output: int | tuple[int, int],
                  seed: int = 0) -> list[Request]:
    """n requests with exponential inter-arrival gaps at `rate_per_s`; prompt/output are fixed
    or drawn uniformly from an inclusive (lo, hi) range."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    if not 0 < rate_per_s < math.inf:
        raise ValueError(f"rate_per_s={rate_per_s} must be a finite number > 0")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1e6 / rate_per_s, n))

    def draw(x):
        return np.full(n, x) if isinstance(x, int) else rng.integers(x[0], x[1] + 1, n)

    return [Request(float(a), int(p), int(o)) for a, p, o in zip(arrivals, draw(prompt), draw(output))]


def load_trace(path: str | Path) -> list[Request]:
    """CSV with columns arrival_us,prompt,output (header required) or a JSON list of objects
    with those keys."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"trace {path} does not exist")
    try:
        if path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        return [Request(float(r["arrival_us"]), int(r["prompt"]), int(r["output"])) for r in rows]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"trace {path}: each row needs arrival_us, prompt, output ({e})") from None


def summarize(results: list[RequestResult]) -> dict:
    if not results:
        return {"requests": 0}
    ttft = np.array([r.ttft_us for r in results])
    itl = np.concatenate([np.array(r.itls_us) for r in results]) if any(r.itls_us for r in results) else np.zeros(1)
    first = min(r.request.arrival_us for r in results)
    last = max(r.departures_us[-1] for r in results)
    tokens = sum(len(r.departures_us) for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "span_s": (last - first) / 1e6,
        "throughput_tokens_per_s": tokens / ((last - first) / 1e6) if last > first else 0.0,
        "ttft_us": {"mean": float(ttft.mean()), "p50": float(np.percentile(ttft, 50)),
                    "p99": float(np.percentile(ttft, 99))},
        "itl_us": {"mean": float(itl.mean()), "p50": float(np.percentile(itl, 50)),
                   "p99": float(np.percentile(itl, 99))},
    }
