"""Timing: the public calibration points, determinism, and how latency moves with load."""

import dataclasses

import pytest

from sim import calibrate
from sim.hardware import PRESETS as HW
from sim.placement import plan
from sim.shapes import get_shape
from sim.timing import COMPONENTS, TimingModel, line_allreduce, summarize


def _tm(model="llama-3.1-8b", context=8192, batch=1, hw=HW["wse3"], precision=16):
    return TimingModel(plan(get_shape(model, precision), hw, context, batch))


@pytest.mark.parametrize("point", calibrate.POINTS, ids=lambda p: p.model)
def test_calibration_points_within_10_percent(point):
    s = calibrate.predict(point)
    assert s["wafers"] == point.wafers
    assert abs(s["error"]) < 0.10, f"{point.model}: {s['tokens_per_s_per_user']:.0f} vs {point.tokens_per_s}"


def test_8b_layer_is_latency_bound_around_17us():
    tm = _tm()
    bd = tm.token_breakdown(640)
    per_layer_us = tm.hw.cycles_to_us(sum(bd.values())) / 32
    assert 14 < per_layer_us < 20
    # communication and synchronisation, not the SRAM-bound GEMV, dominate
    assert bd["reduce"] + bd["sync"] + bd["attention"] > 2 * bd["matvec"]


def test_same_inputs_identical_cycles():
    a, b = _tm("llama-3.1-70b"), _tm("llama-3.1-70b")
    for t in (1, 513, 4000, 8192):
        assert a.token_breakdown(t) == b.token_breakdown(t)
        assert isinstance(a.token_cycles(t), int)
    assert a.ttft_cycles(512) == b.ttft_cycles(512)
    assert list(a.departure_cycles(100, 50)) == list(b.departure_cycles(100, 50))


def test_breakdown_sums_to_token_latency_and_array_matches_scalar():
    import numpy as np

    tm = _tm("llama-3.1-70b")
    ts = np.array([1, 100, 1000, 5000, 8192])
    assert set(tm.token_breakdown(10)) == set(COMPONENTS)
    for t, arr in zip(ts, tm.token_cycles_array(ts)):
        assert sum(tm.token_breakdown(int(t)).values()) == tm.token_cycles(int(t)) == arr
    for t, arr in zip(ts, tm.bottleneck_cycles_array(ts)):
        assert tm.bottleneck_cycles(int(t)) == arr
    assert tm.token_breakdown(10)["wafer_to_wafer"] > 0  # 4 wafers: crossings are charged


def test_longer_context_is_never_faster():
    tm = _tm()
    lat = [tm.token_cycles(t) for t in range(1, 8193, 97)]
    assert lat == sorted(lat) and lat[-1] > lat[0]
    ttft = [tm.ttft_cycles(n) for n in (1, 16, 128, 512, 2048)]
    assert ttft == sorted(ttft) and ttft[-1] > 100 * ttft[0] / 10


def test_sequences_share_the_pipeline():
    tm = _tm(batch=64)
    one, many = tm.itl_cycles(1000, 1), tm.itl_cycles(1000, 64)
    assert one == tm.token_cycles(1000)  # a lone sequence sees the full loop latency
    assert many > one  # 64 sequences are more than the ~34 regions can interleave for free
    s1 = summarize(tm, 512, 64, 1)
    s8 = summarize(tm, 512, 64, 8)
    assert s8["pipeline_tokens_per_s"] > 7 * s1["pipeline_tokens_per_s"]  # pipelining pays
    assert s8["pipeline_tokens_per_s"] <= s8["max_pipeline_tokens_per_s"] + 1e-6


def test_cached_prompt_tokens_cut_ttft():
    tm = _tm()
    assert tm.ttft_cycles(1024, cached=1000) < tm.ttft_cycles(1024) / 10
    assert tm.ttft_cycles(1024, cached=1024) == tm.ttft_cycles(1024, cached=1023)


def test_8bit_weights_are_faster_and_smaller_regions():
    t16, t8 = _tm(), _tm(precision=8)
    assert t8.token_cycles(600) < t16.token_cycles(600)
    assert t8.plan.regions[1].pes < t16.plan.regions[1].pes


def test_reduction_cost_grows_with_line_length_and_payload():
    hw = HW["wse3"]
    assert line_allreduce(hw, 1, 100) == 0
    assert line_allreduce(hw, 101, 1) == 50 * (2 * hw.hop_latency_cycles + hw.reduce_stage_cycles) + 1
    assert line_allreduce(hw, 101, 64) - line_allreduce(hw, 101, 1) == 63


def test_hardware_constants_move_the_result_the_right_way():
    base = _tm().token_cycles(600)
    slower = dataclasses.replace(HW["wse3"], reduce_stage_cycles=48)
    assert _tm(hw=slower).token_cycles(600) > base
    wse2 = _tm(hw=HW["wse2"])
    assert wse2.plan.n_wafers == 1


def test_the_docstring_sensitivity_table_is_what_calibrate_computes():
    import re

    import sim.timing

    table = sim.timing.__doc__.split("Sensitivity of tok/s")[1].split("\nA GEMV")[0]
    rows = {m[0]: (float(m[1]), float(m[2]))
            for m in re.findall(r"^  (\w+) .*?([+-]?\d+\.\d)% / +([+-]?\d+\.\d)%", table, re.M)}
    computed = {r["constant"]: r for r in calibrate.sensitivity()}
    assert set(rows) == {"reduce_stage_cycles", "phase_overhead_cycles", "hop_latency_cycles", "w2w_latency_ns",
                         "clock_hz"}
    for name, (small, big) in rows.items():
        r = computed[name]
        assert (small, big) == (round(100 * r["llama-3.1-8b"], 1), round(100 * r["llama-3.1-70b"], 1)), name
    assert computed["hop_latency_cycles"]["step"] == 1.0  # 1 -> 2 cycles: +100%, not ~10%
