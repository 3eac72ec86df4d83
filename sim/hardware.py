"""The wafer as named parameters (public figures from ../shared/wse3-facts.md, or "assumed").

Labels in the docstrings: O = official Cerebras figure, S = secondary source, I = inferred from
public code, D = arithmetic from the others, assumed = not public, reasoning given.

The two timing constants that are not public (`reduce_stage_cycles`, `phase_overhead_cycles`)
were chosen once so that the timing model lands on both public calibration points (Llama 3.1 8B
at 1,800 tok/s on one CS-3 and 70B at 450 tok/s on four); the same values serve every model.
See sim/timing.py for what each one does to the result.

Overrides come from TOML: either ``--hw wse3 --hw-config overrides.toml`` (keys are field
names) or ``--hw my.toml`` whose ``base = "wse3"`` names the preset it starts from.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path


SANE_RANGES: dict[str, tuple[float, float]] = {
    "clock_hz": (1e6, 1e10),
    "w2w_bits_per_s": (1e6, 1e15),
}
"""Accepted range of each rate (fields typed float), in the field's unit. Assumed sanity bounds,
not hardware facts: a core clock outside 1 MHz-10 GHz or a wafer-to-wafer link outside
1 Mb/s-1 Pb/s is a typo (usually the exponent; the presets are 1.1 GHz and 1.2 Tb/s)."""

_POSITIVE = {"pe_rows", "pe_cols", "sram_bytes_per_pe", "simd_fp16", "sram_read_ports",
             "sram_write_ports", "sram_port_bits", "link_bits_per_cycle", "wafers_per_system"}
"""Counts that must be >= 1; the other counts (latencies, overheads, reserved bytes) may be 0."""


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    pe_rows: int
    """PE grid rows the SDK compiles for. I: WaferLLM compile scripts (WSE-3 762, WSE-2 757)."""
    pe_cols: int
    """PE grid columns. I: WaferLLM compile scripts (WSE-3 1172, WSE-2 996)."""
    sram_bytes_per_pe: int = 48 * 1024
    """Private SRAM per PE, bytes. S: Argonne AI-testbed user guides (48 KB on CS-2 and CS-3)."""
    clock_hz: float = 1.1e9
    """Core clock, Hz. O for WSE-2 (Hot Chips 34); WSE-3 not disclosed, assumed the same as public
    work does."""
    simd_fp16: int = 8
    """FP16 FMACs per cycle per PE (SIMD width). S: NextPlatform 2024-03-14 (WSE-3 8, WSE-2 4)."""
    sram_read_ports: int = 2
    """64-bit SRAM reads per cycle per PE. O for WSE-2 (Hot Chips 34); WSE-3 assumed the same:
    D, total SRAM bandwidth barely moved (21 vs 20 PB/s) while the PE count grew 6%."""
    sram_write_ports: int = 1
    """64-bit SRAM writes per cycle per PE. O for WSE-2; WSE-3 assumed the same (as above)."""
    sram_port_bits: int = 64
    """Width of one SRAM port, bits. O (WSE-2, Hot Chips 34)."""
    link_bits_per_cycle: int = 32
    """Fabric link width per direction, bits/cycle. D: 214 Pb/s / 900k PEs ~ 216 bit/cycle/PE,
    i.e. 4 neighbours x 32 bit x 2 directions (~256) less framing."""
    hop_latency_cycles: int = 1
    """Router-to-router latency of one fabric hop, cycles. I: SDK examples correct skew by
    (px + py) cycles."""
    wafers_per_system: int = 64
    """Wafers (CS-3 / CS-2 systems) one pipeline may span: the largest deployment we plan for.
    O: Condor Galaxy 3 is 64 CS-3 (Mar 2024), Condor Galaxy 1 is 64 CS-2 (Jul 2023); Cerebras
    quotes clusters of up to 2,048 CS-3 (set this higher in a TOML file to plan for one)."""
    w2w_bits_per_s: float = 1.2e12
    """Wafer-to-wafer bandwidth, bits/s (one system's off-wafer I/O). S: 12 x 100 GbE."""
    w2w_latency_ns: int = 2000
    """One wafer-to-wafer hand-off latency, ns. Assumed: two Ethernet MACs, one switch and the
    SwarmX/host forwarding path; ~2 us is typical for such a path. It is <1% of a 70B token."""
    reserved_bytes_per_pe: int = 2048
    """SRAM per PE kept for code, task tables and the runtime, bytes. Assumed: CSL programs of the
    GEMV/attention kind compile to a few KB; 2 KB leaves 46 KB for data."""
    buffer_bytes_per_pe: int = 1024
    """Working buffers per PE (activation slices, fp32 partial sums, double-buffered), bytes.
    Assumed: the largest per-PE slice in these layouts is a few hundred fp32 values."""
    reduce_stage_cycles: int = 24
    """Cycles one PE adds to a chained fabric reduction beyond the two hops: the wavelet climbs
    the ramp from router to PE, wakes the receive task, the fp32 add completes (pipelined FPU),
    the result goes down the ramp again. Assumed, calibrated once (see timing.py); ~20 ns per
    stage is what a software-mediated step costs where a bare hop costs 1 cycle."""
    phase_overhead_cycles: int = 300
    """Fixed cost of one synchronised phase of a layer (a GEMV, a norm, a softmax step, a
    hand-off): configuring data-structure descriptors and routes, starting the vector engine,
    draining the pipeline and the completion wavelet. Assumed (calibrated once, see timing.py)."""

    def __post_init__(self) -> None:
        """Counts (fields typed int) must be integers, >= 1 where zero makes no sense; rates
        (fields typed float) must be numbers within SANE_RANGES. Booleans are not numbers."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"hardware name must be a non-empty string; got {self.name!r}")
        for f in dataclasses.fields(self):
            if f.name == "name":
                continue
            v = getattr(self, f.name)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if f.type == "int":
                lo = 1 if f.name in _POSITIVE else 0
                ok, want = number and isinstance(v, int) and v >= lo, f"an integer >= {lo}"
            else:  # every float field has a sane range (NaN fails the comparison)
                lo, hi = SANE_RANGES[f.name]
                ok, want = number and lo <= v <= hi, f"a number in [{lo:g}, {hi:g}]"
            if not ok:
                raise ValueError(f"hardware {self.name}: {f.name} must be {want}; "
                                 f"got {v!r} ({type(v).__name__})")
            if f.type == "float":
                object.__setattr__(self, f.name, float(v))
        if self.data_bytes_per_pe <= 0:
            raise ValueError(f"hardware {self.name}: reserved + buffer bytes "
                             f"({self.reserved_bytes_per_pe + self.buffer_bytes_per_pe}) leave no "
                             f"SRAM of {self.sram_bytes_per_pe} bytes per PE for data")

    # --- derived -------------------------------------------------------------------------
    @property
    def pes_per_wafer(self) -> int:
        return self.pe_rows * self.pe_cols

    @property
    def data_bytes_per_pe(self) -> int:
        """SRAM per PE left for weights and KV cache."""
        return self.sram_bytes_per_pe - self.reserved_bytes_per_pe - self.buffer_bytes_per_pe

    def gemv_macs_per_cycle(self, bytes_per_weight: float) -> float:
        """Matrix-vector FMACs per cycle per PE: the SIMD width, or the SRAM ports if lower.

        Each FMAC of y += W[:, j] * x[j] reads one weight and one fp16 accumulator and writes the
        accumulator back (the csl-examples GEMV pattern); x[j] sits in a register."""
        read_bytes = self.sram_read_ports * self.sram_port_bits / 8
        write_bytes = self.sram_write_ports * self.sram_port_bits / 8
        return min(float(self.simd_fp16), read_bytes / (bytes_per_weight + 2.0), write_bytes / 2.0)

    @property
    def link_fp32_per_cycle(self) -> float:
        return self.link_bits_per_cycle / 32

    def ns_to_cycles(self, ns: float) -> int:
        return int(round(ns * 1e-9 * self.clock_hz))

    def cycles_to_us(self, cycles: float) -> float:
        return cycles / self.clock_hz * 1e6


PRESETS: dict[str, HardwareSpec] = {
    "wse3": HardwareSpec(name="wse3", pe_rows=762, pe_cols=1172),
    "wse2": HardwareSpec(name="wse2", pe_rows=757, pe_cols=996, simd_fp16=4),
}

_FIELDS = {f.name for f in dataclasses.fields(HardwareSpec)}


def with_overrides(base: HardwareSpec, overrides: dict, source: str = "overrides") -> HardwareSpec:
    """`base` with fields replaced; unknown keys are an error that names them."""
    unknown = sorted(set(overrides) - _FIELDS)
    if unknown:
        raise ValueError(f"{source}: unknown hardware key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_FIELDS - {'name'}))}")
    return dataclasses.replace(base, **overrides)


def load_toml(path: str | Path, base: HardwareSpec | None = None) -> HardwareSpec:
    """A spec from a TOML file: ``base = "wse3"`` (or the `base` argument) plus overrides."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"hardware config {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"hardware config {path}: {e}") from None
    preset = data.pop("base", None)
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"hardware config {path}: base must be a preset name such as \"wse3\"; "
                         f"got {preset!r}")
    if preset is not None:
        base = get_hardware(preset)
    if base is None:
        raise ValueError(f"hardware config {path}: needs base = \"wse3\" or \"wse2\"")
    name = data.pop("name", f"{base.name}+{path.stem}")
    return with_overrides(dataclasses.replace(base, name=name), data, source=str(path))


def get_hardware(spec: str, config: str | Path | None = None) -> HardwareSpec:
    """`spec` is a preset name or a .toml path; `config` is an optional overrides file."""
    if spec.endswith(".toml"):
        hw = load_toml(spec)
    else:
        try:
            hw = PRESETS[spec.lower()]
        except KeyError:
            raise ValueError(f"unknown hardware {spec!r}; presets: {', '.join(PRESETS)} "
                             f"or a .toml file") from None
    if config is not None:
        hw = load_toml(config, base=hw)
    return hw
