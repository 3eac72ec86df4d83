"""Serving metrics as pure functions over per-request records (no server, no clock: unit-testable).

Definitions (client side, as `vllm bench serve`; times in seconds inside, milliseconds in keys):
  TTFT   first token received - request sent
  ITL    per output token after the first: its receive time - the previous token's receive time.
         A coalesced chunk of n tokens that arrives a gap g after the previous token gives n ITLs:
         g for its first token and 0 for the others, because that is when the client saw them (all
         n at once). So every request gives output_len - 1 ITLs, they sum to the last token's time
         minus the first's, and the mean ITL of a request equals its decode rate; the percentiles
         show the chunking (p99 = the chunk gap, p50 = 0 with coalesce >= 2). vLLM records one ITL
         per streamed chunk, which is this rule with the zeros dropped; splitting g evenly would
         report a smoothness no client saw.
  TPOT   (e2el - ttft) / (output_len - 1), per request; requests with one token have none (for
         goodput they count as TPOT 0, as vLLM does)
  E2EL   the Final received - request sent
  goodput  completed requests per second meeting every given SLO (ttft, tpot, e2el; in ms)
Statistics: mean, median, std (population), and numpy's linear percentiles; an empty list gives
0.0 for each (as vLLM), so the keys are always numbers.

Simulated (wafer serve --emulate): each token carries its simulated departure time from the
request's arrival (sim_time_us); sim TTFT is the first token's, sim ITLs the differences (per
token: the wafer has a time for every token even inside a chunk), sim TPOT and sim E2EL likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

NS = 1e-9  # seconds per nanosecond
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What the load generator saw of one request (monotonic nanoseconds, client clock)."""
    index: int
    input_len: int = 0            # prompt tokens (the server's count when it answered)
    start_ns: int = 0             # sent
    end_ns: int = 0               # its Final received (or the error)
    token_ns: list[int] = field(default_factory=list)      # receive time of each token
    sim_time_us: list[int] = field(default_factory=list)   # simulated departure of each token
    step_ns: list[int] = field(default_factory=list)      # engine_step_ns of each token's chunk
    output_len: int | None = None  # usage.completion_tokens (None: count token_ns)
    finish_reason: str = ""
    generated_text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    error_code: str = ""          # gRPC status name, e.g. "INVALID_ARGUMENT"

    @property
    def success(self) -> bool:
        return not self.error_code and bool(self.token_ns)

    @property
    def n_out(self) -> int:
        return self.output_len if self.output_len is not None else len(self.token_ns)

    @property
    def ttft(self) -> float:
        return (self.token_ns[0] - self.start_ns) * NS

    @property
    def e2el(self) -> float:
        return (self.end_ns - self.start_ns) * NS

    @property
    def itls(self) -> list[float]:
        t = self.token_ns
        return [(t[i] - t[i - 1]) * NS for i in range(1, len(t))]

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.n_out - 1) if self.n_out > 1 else None


def itls_from_chunks(gaps_s: Iterable[float], sizes: Iterable[int]) -> list[float]:
    """The ITL rule on chunks: a chunk of n tokens after a gap g gives [g, 0, ..., 0] (n values);
    the first chunk's first token is the TTFT's, not an ITL."""
    out = []
    for g, n in zip(gaps_s, sizes):
        out += [g] + [0.0] * (n - 1)
    return out[1:]


def stats(values_s: list[float], name: str, percentiles: Iterable[float]) -> dict[str, float]:
    """mean/median/std/pXX of values in seconds, as ``{mean_<name>_ms: ...}``."""
    v = np.asarray(values_s if len(values_s) else [0.0], dtype=float) * 1e3
    out = {f"mean_{name}_ms": float(v.mean()), f"median_{name}_ms": float(np.median(v)),
           f"std_{name}_ms": float(v.std())}
    for p in percentiles:
        out[f"p{percentile_word(p)}_{name}_ms"] = float(np.percentile(v, p))
    return out


def percentile_word(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (vLLM's key spelling)."""
    return str(int(p)) if int(p) == p else str(p)


def is_good(rec: RequestRecord, slo_ms: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO (ms); a request with one token has TPOT 0."""
    have = {"ttft": rec.ttft, "tpot": rec.tpot or 0.0, "e2el": rec.e2el}
    return all(have[k] * 1e3 <= v for k, v in slo_ms.items())


def parse_goodput(items: list[str]) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}``; ValueError naming the item."""
    out = {}
    for item in items:
        key, sep, val = item.partition(":")
        if not sep or key not in SLO_METRICS:
            raise ValueError(f"--goodput {item!r}: expected METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}")
        try:
            ms = float(val)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {val!r} is not a number of milliseconds") from None
        if not ms > 0 or math.isinf(ms):
            raise ValueError(f"--goodput {item!r}: the SLO must be a positive number of milliseconds")
        out[key] = ms
    return out


def peak_concurrency(intervals: Iterable[tuple[int, int]]) -> int:
    """Most intervals [start, end) open at once (an end at t closes before a start at t)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return peak


def peak_tokens_per_s(records: list[RequestRecord]) -> float:
    """Most output tokens received within one 1-second bucket of the run (vLLM's
    max_output_tokens_per_s)."""
    times = [t for r in records if r.success for t in r.token_ns]
    if not times:
        return 0.0
    t0 = min(r.start_ns for r in records if r.success)
    return float(np.bincount(((np.asarray(times) - t0) // 1_000_000_000).astype(int)).max())


def sim_summary(records: list[RequestRecord], percentiles: Iterable[float]) -> dict[str, Any]:
    """sim_* keys from the stamped simulated times; empty when no token carries one."""
    ok = [r for r in records if r.success and r.sim_time_us and len(r.sim_time_us) == len(r.token_ns)]
    if not ok:
        return {}
    us = 1e-6
    ttfts = [r.sim_time_us[0] * us for r in ok]
    itls = [(b - a) * us for r in ok for a, b in zip(r.sim_time_us, r.sim_time_us[1:])]
    tpots = [(r.sim_time_us[-1] - r.sim_time_us[0]) * us / (len(r.sim_time_us) - 1)
             for r in ok if len(r.sim_time_us) > 1]
    e2els = [r.sim_time_us[-1] * us for r in ok]
    out: dict[str, Any] = {"sim_completed": len(ok)}
    for name, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(stats(vals, f"sim_{name}", percentiles))
    return out


def summarize(records: list[RequestRecord], duration_s: float, percentiles: Iterable[float] = (99,),
              goodput_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """The metric keys of a `vllm bench serve` result (plus errors_by_code and sim_*), from the
    records of one run that took ``duration_s``."""
    percentiles = list(percentiles)
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    n_in = sum(r.input_len for r in ok)
    n_out = sum(r.n_out for r in ok)
    dur = max(duration_s, 1e-12)
    by_code: dict[str, int] = {}
    for r in failed:
        code = r.error_code or "NO_TOKENS"
        by_code[code] = by_code.get(code, 0) + 1
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": len(ok) / dur,
        "request_goodput": (sum(is_good(r, goodput_ms) for r in ok) / dur) if goodput_ms else None,
        "output_throughput": n_out / dur,
        "total_token_throughput": (n_in + n_out) / dur,
        "max_output_tokens_per_s": peak_tokens_per_s(records),
        "max_concurrent_requests": peak_concurrency([(r.start_ns, r.end_ns) for r in ok]),
    }
    values = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [x for r in ok for x in r.itls], "e2el": [r.e2el for r in ok]}
    for name in METRICS:
        out.update(stats(values[name], name, percentiles))
    out.update({
        "input_lens": [r.input_len for r in records],
        "output_lens": [r.n_out if r.success else 0 for r in records],
        "ttfts": [r.ttft if r.success else 0.0 for r in records],
        "itls": [r.itls if r.success else [] for r in records],
        "latencies": [r.e2el if r.success else 0.0 for r in records],
        "generated_texts": [r.generated_text for r in records],
        "errors": [f"{r.error_code}: {r.error}" if r.error_code else "" for r in records],
        "errors_by_code": by_code,
        "goodput_slo_ms": goodput_ms or None,
    })
    out.update(sim_summary(records, percentiles))
    return out
