"""The public calibration points and what each assumed constant does to them.

`wafer sim calibrate` prints both; tests assert the points stay within 10%.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sim.hardware import HardwareSpec, get_hardware
from sim.placement import plan
from sim.shapes import get_shape
from sim.timing import TimingModel, summarize


@dataclass(frozen=True)
class CalibrationPoint:
    model: str
    hardware: str
    wafers: int
    tokens_per_s: float
    source: str


# Decode tokens/s per user, 16-bit, no speculative decoding (Cerebras Inference launch, Aug 2024).
POINTS = (
    CalibrationPoint("llama-3.1-8b", "wse3", 1, 1800.0, "O: Cerebras Inference launch, Aug 2024"),
    CalibrationPoint("llama-3.1-70b", "wse3", 4, 450.0, "O: Cerebras Inference launch, Aug 2024"),
)
# The workload the points are evaluated at (a chat-sized request; attention is a small share at
# this length, so the exact choice moves the result by well under 1%).
PROMPT, OUTPUT, CONTEXT = 512, 256, 8192

# The assumed constants whose effect we report.
ASSUMED = ("reduce_stage_cycles", "phase_overhead_cycles", "hop_latency_cycles", "w2w_latency_ns",
           "clock_hz", "reserved_bytes_per_pe", "buffer_bytes_per_pe")


def predict(point: CalibrationPoint, hw: HardwareSpec | None = None) -> dict:
    hw = hw or get_hardware(point.hardware)
    p = plan(get_shape(point.model), hw, CONTEXT, 1)
    s = summarize(TimingModel(p), PROMPT, OUTPUT)
    s["public_tokens_per_s"] = point.tokens_per_s
    s["error"] = s["tokens_per_s_per_user"] / point.tokens_per_s - 1
    s["public_wafers"] = point.wafers
    return s


def sensitivity(step: float = 0.10) -> list[dict]:
    """For each assumed constant: raise it by `step` (integers by at least 1, so a 1-cycle hop
    latency goes to 2, +100%) and report the step actually taken (`step`) and the relative
    change in tok/s at each calibration point."""
    rows = []
    base = {pt.model: predict(pt)["tokens_per_s_per_user"] for pt in POINTS}
    for name in ASSUMED:
        row = {"constant": name}
        for pt in POINTS:
            hw = get_hardware(pt.hardware)
            v = getattr(hw, name)
            new = v * (1 + step) if isinstance(v, float) else max(v + 1, round(v * (1 + step)))
            row["from"], row["to"], row["step"] = v, new, new / v - 1
            tps = predict(pt, dataclasses.replace(hw, **{name: type(v)(new)}))["tokens_per_s_per_user"]
            row[pt.model] = tps / base[pt.model] - 1
        rows.append(row)
    return rows
