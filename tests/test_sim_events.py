"""Discrete-event mode: agreement with the analytic clock, ordering, sharing, traces."""

import json

import pytest

from sim.clock import WaferClock
from sim.events import Request, load_trace, poisson_trace, simulate, summarize


@pytest.fixture(scope="module")
def tm():
    return WaferClock.from_spec("wse3:llama-3.1-8b", max_sequences=8).timing


@pytest.mark.parametrize("prompt,output,chunk", [(1, 1, 32), (7, 3, 1), (512, 40, 32), (300, 10, 1000)])
def test_single_request_matches_the_analytic_schedule(tm, prompt, output, chunk):
    (res,) = simulate(tm, [Request(250.0, prompt, output)], prefill_chunk=chunk)
    analytic = tm.departure_cycles(prompt, output)
    cyc_per_us = tm.hw.clock_hz / 1e6
    assert [round(d * cyc_per_us) for d in res.departures_us] == [250 * 1100 + int(c) for c in analytic]


def test_tokens_depart_in_order_and_after_arrival(tm):
    reqs = poisson_trace(200, 200.0, (16, 600), (1, 120), seed=3)
    for r in simulate(tm, reqs):
        d = r.departures_us
        assert len(d) == r.request.output
        assert d[0] > r.request.arrival_us
        assert all(b > a for a, b in zip(d, d[1:]))


def test_sharing_the_pipeline_slows_everyone_down(tm):
    alone = simulate(tm, [Request(0.0, 256, 64)])[0]
    crowd = simulate(tm, [Request(0.0, 256, 64) for _ in range(8)])
    assert all(r.departures_us[-1] > alone.departures_us[-1] for r in crowd[1:])
    # FCFS: the first arrival's prompt gets in first
    assert crowd[0].ttft_us < crowd[-1].ttft_us


def test_kv_slots_queue_later_arrivals(tm):
    reqs = [Request(0.0, 64, 32) for _ in range(3)]
    one_slot = simulate(tm, reqs, max_in_flight=1)
    # with one slot each request starts after the previous one finished
    for a, b in zip(one_slot, one_slot[1:]):
        assert b.departures_us[0] > a.departures_us[-1]


def test_same_trace_same_times(tm):
    reqs = poisson_trace(50, 100.0, 128, 32, seed=7)
    assert [r.departures_us for r in simulate(tm, reqs)] == [r.departures_us for r in simulate(tm, reqs)]
    assert poisson_trace(5, 1.0, 1, 1, seed=1) != poisson_trace(5, 1.0, 1, 1, seed=2)


def test_trace_files(tmp_path, tm):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("arrival_us,prompt,output\n0,10,5\n1000,20,3\n")
    json_path = tmp_path / "t.json"
    json_path.write_text(json.dumps([{"arrival_us": 0, "prompt": 10, "output": 5},
                                     {"arrival_us": 1000, "prompt": 20, "output": 3}]))
    assert load_trace(csv_path) == load_trace(json_path) == [Request(0, 10, 5), Request(1000, 20, 3)]
    s = summarize(simulate(tm, load_trace(csv_path)))
    assert s["requests"] == 2 and s["tokens"] == 8
    bad = tmp_path / "bad.csv"
    bad.write_text("when,prompt\n1,2\n")
    with pytest.raises(ValueError, match="needs arrival_us, prompt, output"):
        load_trace(bad)


@pytest.mark.parametrize("others", [3, 15, 47])
def test_a_prompt_among_decoding_sequences_matches_the_analytic_load_model(others):
    """The analytic TTFT under load (first come, first served equilibrium) and the S-sequence
    ITL agree with the event mode, below saturation (3, 15 others) and above it (47)."""
    clock = WaferClock.from_spec("wse3:llama-3.1-8b", max_sequences=64)
    reqs = [Request(0.0, 8, 3000) for _ in range(others)] + [Request(200_000.0, 512, 200)]
    last = simulate(clock.timing, reqs, prefill_chunk=1)[-1]
    s = others + 1
    assert last.ttft_us == pytest.approx(clock.ttft_us(512, sequences_in_flight=s), rel=0.10)
    assert last.itls_us[100] == pytest.approx(clock.itl_us(512 + 101, sequences_in_flight=s), rel=1e-6)


def test_zero_in_flight_and_bad_rates_are_errors_not_defaults(tm):
    with pytest.raises(ValueError, match="max_in_flight=0 must be >= 1"):
        simulate(tm, [Request(0.0, 8, 2)], max_in_flight=0)
    for rate in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            poisson_trace(3, rate, 8, 2)
    with pytest.raises(ValueError, match="arrival finite"):
        Request(float("nan"), 8, 2)
