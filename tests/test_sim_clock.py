"""WaferClock: the server's per-token schedule."""

import pytest

from sim.clock import WaferClock
from sim.hardware import PRESETS as HW
from sim.placement import PlacementError
from sim.shapes import get_shape


@pytest.fixture(scope="module")
def clock():
    return WaferClock.from_spec("wse3:llama-3.1-8b")


def test_from_spec_matches_constructor(clock):
    direct = WaferClock(HW["wse3"], get_shape("llama-3.1-8b"))
    assert direct.departure_times_us(100, 10) == clock.departure_times_us(100, 10)
    assert clock.n_wafers == 1 and clock.context == 8192


def test_departures_are_ttft_then_itl_gaps(clock):
    d = clock.departure_times_us(300, 20)
    assert len(d) == 20
    assert d[0] == clock.ttft_us(300)
    for i in range(1, 20):
        assert d[i] - d[i - 1] == pytest.approx(clock.itl_us(300 + i), abs=1e-6)
    assert d == sorted(d)


def test_itl_is_the_calibrated_per_user_rate(clock):
    assert 1e6 / clock.itl_us(600) == pytest.approx(1800, rel=0.10)


def test_cached_prompt_and_load(clock):
    assert clock.ttft_us(2000, cached_tokens=1990) < clock.ttft_us(2000) / 10
    assert clock.ttft_us(500, sequences_in_flight=4) > clock.ttft_us(500)
    assert clock.itl_us(500, sequences_in_flight=200) > clock.itl_us(500)
    assert clock.departure_times_us(10, 0) == []


def test_deterministic_across_instances():
    a = WaferClock.from_spec("wse3:llama-3.1-70b", max_sequences=2)
    b = WaferClock.from_spec("wse3:llama-3.1-70b", max_sequences=2)
    assert a.departure_times_us(512, 64, 0, 2) == b.departure_times_us(512, 64, 0, 2)
    assert a.n_wafers == 4


@pytest.mark.parametrize("spec,match", [
    ("wse3", "must look like"),
    ("wse9:llama-3.1-8b", "unknown hardware 'wse9'"),
    ("wse3:gpt-5", "unknown model 'gpt-5'"),
])
def test_bad_specs_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        WaferClock.from_spec(spec)


def test_8bit_spec_and_unfittable_context():
    assert WaferClock.from_spec("wse3:llama-3.1-70b:8").n_wafers == 2
    with pytest.raises(PlacementError, match="short by"):
        WaferClock.from_spec("wse3:llama-3.1-405b", max_sequences=128, context=131072)


def test_context_zero_is_an_error_not_the_default():
    with pytest.raises(PlacementError, match="context=0 must be >= 1"):
        WaferClock(HW["wse3"], get_shape("llama-3.1-8b"), context=0)
