"""Cycle costs of the work inside one region (see sim/timing.py for the layout they assume).

Kept apart from timing so that placement can ask which region width is fastest without a
circular import. Everything here is an integer cycle count from hardware constants and shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sim.hardware import HardwareSpec
from sim.shapes import ModelShape

COMPONENTS = ("matvec", "reduce", "attention", "sync", "handoff", "wafer_to_wafer")


def line_allreduce(hw: HardwareSpec, n: int, m: int) -> int:
    """Cycles to all-reduce m fp32 values over a line of n PEs (chained, pipelined)."""
    if n <= 1:
        return 0
    stages = (n - 1 + 1) // 2
    return stages * (2 * hw.hop_latency_cycles + hw.reduce_stage_cycles) + math.ceil(m / hw.link_fp32_per_cycle)


def _gemv(hw: HardwareSpec, rate: float, rows_in: int, cols_out: int) -> int:
    return math.ceil(rows_in * cols_out / rate)


@dataclass
class StageCost:
    """One region's cycles for one token: a fixed part by component, plus attention that grows
    with context: ceil(ceil(t / attn_positions_div) * attn_macs_per_position / rate)."""

    fixed: dict
    attn_positions_div: int = 0
    attn_macs_per_position: int = 0
    rate: float = 1.0
    head_cycles: int = 0  # part of `fixed` spent on the output head (skipped for prompt tokens)

    def attention(self, t: int) -> int:
        if not self.attn_positions_div:
            return 0
        return math.ceil(-(-t // self.attn_positions_div) * self.attn_macs_per_position / self.rate)

    def attention_array(self, t: np.ndarray) -> np.ndarray:
        if not self.attn_positions_div:
            return np.zeros_like(t)
        per_pe = -(-t // self.attn_positions_div)
        return np.ceil(per_pe * self.attn_macs_per_position / self.rate).astype(np.int64)

    @property
    def fixed_total(self) -> int:
        return sum(self.fixed.values())


def region_cost(hw: HardwareSpec, s: ModelShape, kind: str, R: int, C: int) -> StageCost:
    """Cycles for one token in a region of R x C PEs holding a stage of `kind` (embed, layer,
    head, embed_head), excluding the hand-off to the next region."""
    rate = hw.gemv_macs_per_cycle(s.bytes_per_weight)
    d = s.d_model
    F = hw.phase_overhead_cycles
    out = dict.fromkeys(COMPONENTS, 0)
    phases = 0
    head = 0
    if kind in ("embed", "embed_head"):
        # The token's row sits in one column; its slices cross the region to the exit edge.
        out["reduce"] += C * hw.hop_latency_cycles + math.ceil(-(-d // R) / hw.link_fp32_per_cycle)
        phases += 1
    if kind in ("head", "embed_head"):
        v_c = -(-s.vocab_size // C)
        red = line_allreduce(hw, R, 1) + line_allreduce(hw, R, v_c) + line_allreduce(hw, C, 2)
        mv = _gemv(hw, rate, -(-d // R), v_c)
        head = red + mv + 3 * F
        out["reduce"] += red
        out["matvec"] += mv
        phases += 3
    if kind != "layer":
        out["sync"] += phases * F
        return StageCost(out, rate=rate, head_cycles=head)
    q, qkv, ffn = s.q_dim, s.qkv_dim, s.d_ffn
    d_r = -(-d // R)
    out["matvec"] += (_gemv(hw, rate, d_r, -(-qkv // C)) + _gemv(hw, rate, -(-q // C), d_r)
                      + _gemv(hw, rate, d_r, -(-2 * ffn // C)) + _gemv(hw, rate, -(-ffn // C), d_r))
    out["reduce"] += (2 * line_allreduce(hw, R, 1) + line_allreduce(hw, R, -(-qkv // C))
                      + line_allreduce(hw, C, d_r) + line_allreduce(hw, R, -(-2 * ffn // C))
                      + line_allreduce(hw, C, d_r))
    # Attention: KV heads over column blocks; several heads share a column when C < n_kv.
    group = s.n_heads // s.n_kv_heads
    block_cols = max(1, C // s.n_kv_heads)
    heads_per_block = -(-s.n_kv_heads // min(C, s.n_kv_heads))
    m = group * (s.head_dim + 2) * heads_per_block
    out["attention"] += line_allreduce(hw, R, m) + line_allreduce(hw, block_cols, m)
    phases += 7
    out["sync"] += phases * F
    return StageCost(out, attn_positions_div=R * block_cols,
                     attn_macs_per_position=2 * group * s.head_dim * heads_per_block, rate=rate)


def region_cycles(hw: HardwareSpec, s: ModelShape, kind: str, R: int, C: int, t: int) -> int:
    """Total cycles of one token at context t in such a region."""
    c = region_cost(hw, s, kind, R, C)
    return c.fixed_total + c.attention(t)
