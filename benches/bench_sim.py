"""Simulator speed: planning, 10,000 decode steps of Llama 3.1 70B on four wafers (the server's
per-token path and the vectorised schedule), and the event mode over 1,000 requests.
Reports, never asserts times. Run: `.venv/bin/python -m pytest benches/bench_sim.py -s`.

Each benchmark's `extra_info` (in `--benchmark-json` output and the terminal report) holds
numbers: `sim_wall_mean_ms` / `sim_wall_min_ms` are the simulator's own run time per call;
`wafers`, `simulated_wafer_tok_s` (decode tokens/s of the simulated wafer pipeline, not the
simulator's speed), `simulated_ttft_ms` and the like describe what was simulated.
"""

from __future__ import annotations

import pytest

from benches.conftest import REPORT
from sim.clock import WaferClock
from sim.events import poisson_trace, simulate, summarize
from sim.hardware import PRESETS
from sim.placement import plan
from sim.shapes import get_shape
from sim.timing import TimingModel

STEPS = 10_000


def _report(name, benchmark, **extra):
    """Record the simulator's wall time and the simulated numbers in the benchmark's JSON
    (`extra_info`) and in the terminal report."""
    s = benchmark.stats.stats
    info = {"sim_wall_mean_ms": round(s.mean * 1e3, 3), "sim_wall_min_ms": round(s.min * 1e3, 3), **extra}
    benchmark.extra_info.update(info)
    REPORT[name] = info


@pytest.fixture(scope="module")
def clock70():
    return WaferClock(PRESETS["wse3"], get_shape("llama-3.1-70b"), max_sequences=1, context=16384)


def test_plan_70b(benchmark):
    p = benchmark(plan, get_shape("llama-3.1-70b"), PRESETS["wse3"], 8192, 1)
    _report("sim plan 70b", benchmark, wafers=p.n_wafers)


def test_plan_and_timing_405b(benchmark):
    tm = benchmark(lambda: TimingModel(plan(get_shape("llama-3.1-405b"), PRESETS["wse3"], 8192, 1)))
    _report("sim plan+timing 405b", benchmark, wafers=tm.plan.n_wafers)


def test_decode_10k_steps_70b_per_call(benchmark, clock70):
    """The server's path: one itl_us call per generated token."""

    def steps():
        t = 0.0
        for i in range(STEPS):
            t += clock70.itl_us(512 + i)
        return t

    total_us = benchmark(steps)
    _report("sim 10k steps 70b per-call", benchmark, wafers=clock70.n_wafers,
            simulated_s=round(total_us / 1e6, 3), simulated_wafer_tok_s=round(STEPS / (total_us / 1e6), 1))


def test_decode_10k_steps_70b_schedule(benchmark, clock70):
    d = benchmark(clock70.departure_times_us, 512, STEPS)
    _report("sim 10k steps 70b schedule", benchmark, wafers=clock70.n_wafers,
            simulated_ttft_ms=round(d[0] / 1e3, 2), simulated_last_token_s=round(d[-1] / 1e6, 3),
            simulated_wafer_tok_s=round((STEPS - 1) / ((d[-1] - d[0]) / 1e6), 1))


def test_event_mode_1000_requests(benchmark):
    tm = WaferClock.from_spec("wse3:llama-3.1-8b", max_sequences=16).timing
    reqs = poisson_trace(1000, 50.0, (64, 1024), (16, 512), seed=0)
    res = benchmark.pedantic(simulate, args=(tm, reqs), rounds=3, iterations=1)
    s = summarize(res)
    _report("sim events 1000 requests", benchmark, wafers=tm.plan.n_wafers, tokens=s["tokens"],
            simulated_wafer_tok_s=round(s["throughput_tokens_per_s"], 1),
            simulated_ttft_ms=round(s["ttft_us"]["mean"] / 1e3, 2))
