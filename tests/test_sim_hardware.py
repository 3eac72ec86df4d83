"""Hardware presets and TOML overrides."""

import dataclasses

import pytest

from sim.hardware import PRESETS, HardwareSpec, get_hardware


def test_presets_carry_public_figures():
    w3, w2 = PRESETS["wse3"], PRESETS["wse2"]
    assert (w3.pe_rows, w3.pe_cols, w3.simd_fp16, w3.sram_bytes_per_pe) == (762, 1172, 8, 49152)
    assert (w2.pe_rows, w2.pe_cols, w2.simd_fp16) == (757, 996, 4)
    # the SDK grid holds ~44 GB of SRAM on WSE-3 (public: 44 GB)
    assert w3.pes_per_wafer * w3.sram_bytes_per_pe / 1e9 == pytest.approx(44, rel=0.02)
    # a GEMV is port-bound at 16-bit: 2 x 64-bit reads of weight + accumulator
    assert w3.gemv_macs_per_cycle(2.0) == 4.0


def test_every_field_is_documented():
    import inspect

    import sim.hardware as mod

    src = inspect.getsource(mod.HardwareSpec)
    for f in dataclasses.fields(HardwareSpec):
        if f.name == "name":
            continue
        doc = src.split(f"    {f.name}:")[1].split('"""')[1]
        assert any(tag in doc for tag in ("O:", "O ", "S:", "I:", "D:", "ssumed")), f.name


def test_overrides_file(tmp_path):
    cfg = tmp_path / "fast.toml"
    cfg.write_text("reduce_stage_cycles = 12\nclock_hz = 1.2e9\n")
    hw = get_hardware("wse3", cfg)
    assert hw.reduce_stage_cycles == 12 and hw.clock_hz == 1.2e9 and hw.pe_rows == 762


def test_standalone_file_with_base(tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_text('base = "wse2"\nname = "wse2-big"\nwafers_per_system = 8\n')
    hw = get_hardware(str(cfg))
    assert (hw.name, hw.wafers_per_system, hw.simd_fp16) == ("wse2-big", 8, 4)


def test_unknown_keys_are_named(tmp_path):
    cfg = tmp_path / "typo.toml"
    cfg.write_text("clok_hz = 1e9\nsram_kb = 96\n")
    with pytest.raises(ValueError, match="unknown hardware key\\(s\\) clok_hz, sram_kb"):
        get_hardware("wse3", cfg)


def test_bad_values_and_files(tmp_path):
    cfg = tmp_path / "neg.toml"
    cfg.write_text("pe_rows = 0\n")
    with pytest.raises(ValueError, match="pe_rows must be an integer >= 1; got 0"):
        get_hardware("wse3", cfg)
    nobase = tmp_path / "nobase.toml"
    nobase.write_text("pe_rows = 10\n")
    with pytest.raises(ValueError, match="needs base"):
        get_hardware(str(nobase))
    with pytest.raises(ValueError, match="does not exist"):
        get_hardware("wse3", tmp_path / "missing.toml")


@pytest.mark.parametrize("line,message", [
    ("pe_rows = 100.5", "pe_rows must be an integer >= 1; got 100.5 (float)"),
    ("pe_rows = true", "pe_rows must be an integer >= 1; got True (bool)"),
    ("pe_cols = 762.0", "pe_cols must be an integer >= 1; got 762.0 (float)"),
    ('simd_fp16 = "8"', "simd_fp16 must be an integer >= 1; got '8' (str)"),
    ("hop_latency_cycles = -1", "hop_latency_cycles must be an integer >= 0; got -1 (int)"),
    ("clock_hz = 1e30", "clock_hz must be a number in [1e+06, 1e+10]; got 1e+30 (float)"),
    ("clock_hz = nan", "clock_hz must be a number in [1e+06, 1e+10]; got nan (float)"),
    ("clock_hz = inf", "clock_hz must be a number in [1e+06, 1e+10]; got inf (float)"),
    ("clock_hz = true", "clock_hz must be a number in [1e+06, 1e+10]; got True (bool)"),
    ("w2w_bits_per_s = 0", "w2w_bits_per_s must be a number in [1e+06, 1e+15]; got 0 (int)"),
    ("base = 5", "base must be a preset name"),
])
def test_values_of_the_wrong_type_or_range_are_named(tmp_path, line, message):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(line + "\n")
    with pytest.raises(ValueError) as e:
        get_hardware("wse3", cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_integer_rate_is_taken_as_a_float(tmp_path):
    cfg = tmp_path / "clock.toml"
    cfg.write_text("clock_hz = 1200000000\n")
    hw = get_hardware("wse3", cfg)
    assert hw.clock_hz == 1.2e9 and isinstance(hw.clock_hz, float)
