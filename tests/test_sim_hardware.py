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
    with pytest.raises(ValueError, match="pe_rows=0 must be > 0"):
        get_hardware("wse3", cfg)
    nobase = tmp_path / "nobase.toml"
    nobase.write_text("pe_rows = 10\n")
    with pytest.raises(ValueError, match="needs base"):
        get_hardware(str(nobase))
    with pytest.raises(ValueError, match="does not exist"):
        get_hardware("wse3", tmp_path / "missing.toml")
