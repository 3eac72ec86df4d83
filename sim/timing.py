"""Timing: how many cycles a token spends in each region of a placed model (integer, deterministic).

Layout inside a region of R rows x C columns (WaferLLM-style alternating GEMV): a vector lives
either "along rows" (row i holds slice i, every column has a copy) or "along columns". A GEMV
whose input lies along rows gives each PE an (input slice x output slice) weight tile; partial
sums are all-reduced along the R PEs of each column, which leaves the output along columns; the
next GEMV goes the other way. Per layer (decode, one token, context t):

  phase          compute (SRAM-port bound FMACs)         all-reduce
  attn norm      -                                       1 value along R
  QKV            ceil(d/R) x ceil(qkv/C)                 ceil(qkv/C) values along R
  attention      positions/PE x group x head_dim x 2     group x (head_dim + 2) along R, then c
  O              ceil(q/C) x ceil(d/R)                   ceil(d/R) along C
  ffn norm       -                                       1 value along R
  gate + up      ceil(d/R) x ceil(2 ffn/C)               ceil(2 ffn/C) along R
  down           ceil(ffn/C) x ceil(d/R)                 ceil(d/R) along C
  hand-off       -                                       ceil(d/R) values over the gap to the next region

Attention: each KV head owns a block of c = C / n_kv_heads columns; its positions are spread
over the block's R x c PEs, each holding whole K and V rows, so scores are local; one
flash-decoding style combine (max, sum, weighted V) reduces over the block.

An all-reduce over a line of n PEs of m fp32 values: reduce towards the middle, each of the
ceil((n-1)/2) stages costing two hops (there and back for the broadcast) plus
`reduce_stage_cycles` in the PE, and the m values streamed at the link rate behind it.
Every phase also pays `phase_overhead_cycles`. GEMV compute runs at min(SIMD width, SRAM ports)
FMACs per cycle (4 on WSE-3 at 16-bit: ports, not SIMD, bound a GEMV). Embedding: a lookup
(one phase, the row crosses the region). Head: final norm, GEMV over the vocabulary, argmax along
C. The sampled token goes back to the embedding (on wafer, or wafer to wafer). Wafer-to-wafer:
`w2w_latency_ns` + bits / `w2w_bits_per_s`, plus hops to and from the wafer edge.

Pipeline: a region works on one token at a time. With S sequences in flight the gap between a
sequence's tokens is max(token latency, S x slowest region) (the two circuits of the cyclic
pipeline). Prompt tokens stream: each enters when the slowest region frees, the last one then
runs the whole path; TTFT is when its sampled token leaves the head. With S sequences in flight
the prompt shares the entry first come, first served with S - 1 decoding sequences (the
equilibrium is derived in `_prompt_stretch`; the event mode checks it). The single-request
path bounds the exact flow-shop recurrence from above and is exact when one region dominates.

Calibration (16-bit, one parameter set for all models; prompt 512 + output 256, plan context
8192; `wafer sim calibrate` reproduces these):
  Llama 3.1 8B,  1 x CS-3: predicted 1,806 tok/s vs 1,800 public (+0.3%); 554 us/token,
                 ~17 us per layer: ~18% GEMV, ~53% reductions, ~15% attention, ~13% phase sync.
  Llama 3.1 70B, 4 x CS-3: predicted   445 tok/s vs   450 public (-1.1%); minimum wafers = 4.
The two unpublished constants, reduce_stage_cycles = 24 and phase_overhead_cycles = 300, were
chosen once on a grid so both points land within ~1%; the points mostly pin down a combination
of the two (23/350 or 25/250 also land within 2.5%), so read them as "a software reduction step
costs ~20 ns and a phase a few hundred ns", not as measured values.
Sensitivity of tok/s to raising one assumed constant by ~10%, whole cycle counts by at least 1
(8B / 70B; `wafer sim calibrate` prints the same, tests check this table against it):
  reduce_stage_cycles   24 -> 26       -4.4% / -4.6%   reductions dominate decode
  phase_overhead_cycles 300 -> 330     -1.3% / -0.8%   8 phases per layer
  hop_latency_cycles    1 -> 2         -4.7% / -4.7%   +100%: two hops per reduction stage (+2 cycles)
  w2w_latency_ns        2000 -> 2200    0.0% / -0.0%   4 crossings x 2 us of a 2.2 ms token
  clock_hz              +10%          +10.0% / +10.0%  everything is counted in cycles
  reserved/buffer bytes +10%            0.0% /  0.0%   regions grow by a few PEs
A GEMV is bound by SRAM ports (reads and the write both allow 4 FMAC/cycle at 16-bit), not by
the 8-wide SIMD. Placement widens each region towards its fastest width where the wafer has room
(sim/placement.py), which is why the 8B (one wafer, 42% of PEs at minimum size) gains.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from sim.costs import COMPONENTS, StageCost, line_allreduce, region_cost  # noqa: F401 (re-export)
from sim.hardware import HardwareSpec
from sim.placement import Plan, Region


def _hops_between(a: Region, b: Region) -> int:
    """Fabric hops from region a's near edge to region b's, plus a band turn's re-spread."""
    dr = max(0, b.row0 - (a.row0 + a.rows), a.row0 - (b.row0 + b.rows))
    dc = max(0, b.col0 - (a.col0 + a.cols), a.col0 - (b.col0 + b.cols))
    turn = a.rows if a.row0 != b.row0 else 0
    return dr + dc + 1 + turn


def _edge_hops(r: Region, hw: HardwareSpec) -> int:
    return min(r.row0, r.col0, hw.pe_rows - r.row0 - r.rows, hw.pe_cols - r.col0 - r.cols) + 1


class TimingModel:
    """Per-token cycles of a placed model; per-region costs are computed once."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.hw = hw = plan.hw
        self.shape = shape = plan.shape
        self.rate = hw.gemv_macs_per_cycle(shape.bytes_per_weight)
        regions = plan.regions
        self.costs: list[StageCost] = []
        for i, r in enumerate(regions):
            nxt = regions[i + 1] if i + 1 < len(regions) else None
            self.costs.append(self._stage_cost(r, nxt))
        # Transfers that are not region work: the loop back from head to embedding, and
        # wafer-to-wafer crossings. Pure delays (links are pipelined), not pipeline occupancy.
        d_bits = shape.d_model * 16
        self.transfer: dict[str, int] = {"handoff": 0, "wafer_to_wafer": 0, "sync": 0}
        for i, r in enumerate(regions[:-1]):
            nxt = regions[i + 1]
            if nxt.wafer != r.wafer:
                self.transfer["wafer_to_wafer"] += self._w2w(d_bits)
                self.transfer["handoff"] += (_edge_hops(r, hw) + _edge_hops(nxt, hw)) * hw.hop_latency_cycles
        first, last = regions[0], regions[-1]
        if first.wafer != last.wafer:
            self.transfer["wafer_to_wafer"] += self._w2w(32)
            self.transfer["handoff"] += (_edge_hops(last, hw) + _edge_hops(first, hw)) * hw.hop_latency_cycles
        elif first is not last:
            self.transfer["handoff"] += _hops_between(last, first) * hw.hop_latency_cycles
        self.transfer["sync"] += hw.phase_overhead_cycles  # the feedback is one more phase
        self._fixed_decode = sum(c.fixed_total for c in self.costs) + sum(self.transfer.values())
        attn = [c for c in self.costs if c.attn_positions_div]
        # Distinct attention shapes (one per region shape) keep per-token evaluation cheap.
        self._attn_groups: dict[tuple, int] = {}
        for c in attn:
            key = (c.attn_positions_div, c.attn_macs_per_position)
            self._attn_groups[key] = self._attn_groups.get(key, 0) + 1
        self._prefill_candidates = self._bottleneck_candidates(prefill=True)
        self._decode_candidates = self._bottleneck_candidates(prefill=False)

    # --- construction ------------------------------------------------------------------------
    def _w2w(self, bits: int) -> int:
        hw = self.hw
        return hw.ns_to_cycles(hw.w2w_latency_ns) + math.ceil(bits / (hw.w2w_bits_per_s / hw.clock_hz))

    def _stage_cost(self, r: Region, nxt: Region | None) -> StageCost:
        cost = region_cost(self.hw, self.shape, r.stage.kind, r.rows, r.cols)
        if nxt is not None and nxt.wafer == r.wafer:
            hw = self.hw
            cost.fixed["handoff"] += (_hops_between(r, nxt) * hw.hop_latency_cycles
                                      + math.ceil(-(-self.shape.d_model // r.rows) / hw.link_fp32_per_cycle))
            cost.fixed["sync"] += hw.phase_overhead_cycles
        return cost

    def _bottleneck_candidates(self, prefill: bool) -> list[StageCost]:
        """Stages that can be the slowest: per attention shape the one with the largest fixed
        part, plus the largest stage without attention."""
        best: dict[tuple, StageCost] = {}
        for c in self.costs:
            key = (c.attn_positions_div, c.attn_macs_per_position)
            fixed = c.fixed_total - (c.head_cycles if prefill else 0)
            if key not in best or fixed > best[key].fixed_total - (best[key].head_cycles if prefill else 0):
                best[key] = c
        return list(best.values())

    # --- queries -----------------------------------------------------------------------------
    def token_breakdown(self, t: int) -> dict[str, int]:
        """Cycles by component for one decode token attending over t positions (the full loop:
        embedding, every layer, head, and back)."""
        out = dict.fromkeys(COMPONENTS, 0)
        for c in self.costs:
            for k, v in c.fixed.items():
                out[k] += v
            out["attention"] += c.attention(t)
        for k, v in self.transfer.items():
            out[k] += v
        return out

    def token_cycles(self, t: int) -> int:
        """Latency of one decode token at context t (sampled token to next sampled token)."""
        return self._fixed_decode + sum(
            n * math.ceil(-(-t // div) * macs / self.rate) for (div, macs), n in self._attn_groups.items())

    def token_cycles_array(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.int64)
        out = np.full(t.shape, self._fixed_decode, dtype=np.int64)
        for (div, macs), n in self._attn_groups.items():
            out += n * np.ceil(-(-t // div) * macs / self.rate).astype(np.int64)
        return out

    def bottleneck_cycles(self, t: int, prefill: bool = False) -> int:
        """Occupancy of the slowest region for a token at context t."""
        cands = self._prefill_candidates if prefill else self._decode_candidates
        return max(c.fixed_total - (c.head_cycles if prefill else 0) + c.attention(t) for c in cands)

    def bottleneck_cycles_array(self, t: np.ndarray, prefill: bool = False) -> np.ndarray:
        t = np.asarray(t, dtype=np.int64)
        cands = self._prefill_candidates if prefill else self._decode_candidates
        return np.max([c.fixed_total - (c.head_cycles if prefill else 0) + c.attention_array(t)
                       for c in cands], axis=0)

    def itl_cycles(self, t: int, sequences: int = 1, drafts: int = 0) -> int:
        """Gap between consecutive tokens of one sequence with `sequences` in flight; with
        `drafts`, between consecutive verify passes (see verify_cycles)."""
        if drafts:
            return self.verify_cycles(t, drafts, sequences)
        return max(self.token_cycles(t), sequences * self.bottleneck_cycles(t))

    def verify_cycles(self, t: int, drafts: int, sequences: int = 1) -> int:
        """Speculative decoding: a pass of the last token and `drafts` draft tokens at context t,
        from the sampled token to the next pass's start. The k + 1 tokens stream through the
        layer pipeline one slowest-region slot apart (as prompt tokens do), so the pass costs
        the token loop plus k slots; with `sequences` in flight each occupies k + 1 slots of the
        slowest region per pass."""
        slot = self.bottleneck_cycles(t)
        return max(self.token_cycles(t) + drafts * slot, sequences * (drafts + 1) * slot)

    def itl_cycles_array(self, t: np.ndarray, sequences: int = 1) -> np.ndarray:
        return np.maximum(self.token_cycles_array(t), sequences * self.bottleneck_cycles_array(t))

    def last_prompt_token_cycles(self, t: int) -> int:
        """From the last prompt token entering the embedding to its sampled token leaving the
        head: the decode loop minus the feedback transfers."""
        return self.token_cycles(t) - sum(self.transfer.values()) + self._forward_transfers

    @functools.cached_property
    def _forward_transfers(self) -> int:
        """Wafer crossings on the forward path (the decode loop also has the feedback one)."""
        regions = self.plan.regions
        hw, d_bits = self.hw, self.shape.d_model * 16
        total = 0
        for a, b in zip(regions, regions[1:]):
            if a.wafer != b.wafer:
                total += self._w2w(d_bits) + (_edge_hops(a, hw) + _edge_hops(b, hw)) * hw.hop_latency_cycles
        return total

    def ttft_cycles(self, prompt: int, cached: int = 0, sequences: int = 1) -> int:
        """Arrival to first sampled token for a prompt of `prompt` tokens, `cached` of which
        already have KV entries, with `sequences` sharing the pipeline."""
        if prompt < 1:
            raise ValueError(f"prompt={prompt} must be >= 1")
        cached = min(max(cached, 0), prompt - 1)
        # Token at position p attends over p + 1 positions; all but the last stream in.
        pos = np.arange(cached + 1, prompt, dtype=np.int64)
        stream = int(self.bottleneck_cycles_array(pos, prefill=True).sum()) if pos.size else 0
        if sequences > 1 and stream:
            stream = math.ceil(stream * self._prompt_stretch(prompt, sequences))
        return stream + self.last_prompt_token_cycles(prompt)

    def _prompt_stretch(self, t: int, sequences: int) -> float:
        """How much S - 1 decoding sequences slow a streaming prompt, first come first served.

        Each decoder enters once per period P: P = T (its loop latency) + its wait W. The prompt
        re-queues after each of its tokens behind the Q = D W / P decoders then waiting
        (D = S - 1), so it gets one slot in Q + 1. With the entry always busy,
        P Q / (Q + 1) = D slot, which gives (P - T)(P - D slot) = slot P; the stretch is
        Q + 1 = P / (P - D slot). Unsaturated this is ~T / (T - D slot) (the free slots);
        saturated it is far below S (decoders spend T of each period in flight)."""
        T, slot, D = self.token_cycles(t), self.bottleneck_cycles(t), sequences - 1
        b = T + (D + 1) * slot
        P = (b + math.sqrt(b * b - 4 * T * D * slot)) / 2
        return P / (P - D * slot)

    def departure_cycles(self, prompt: int, n_tokens: int, cached: int = 0, sequences: int = 1) -> np.ndarray:
        """Cycle offsets from arrival at which each of n_tokens sampled tokens leaves the wafer."""
        if n_tokens < 1:
            return np.zeros(0, dtype=np.int64)
        first = self.ttft_cycles(prompt, cached, sequences)
        gaps = self.itl_cycles_array(np.arange(prompt + 1, prompt + n_tokens, dtype=np.int64), sequences)
        return first + np.concatenate(([0], np.cumsum(gaps)))


def tokens_per_pass(acceptance: float, drafts: int) -> float:
    """Speculative decoding: expected tokens a verify pass of `drafts` drafts emits when each
    draft is accepted with probability `acceptance` given the ones before it were:
    1 + a + a^2 + ... + a^k (the accepted run plus the correction or bonus token)."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance={acceptance} must be in [0, 1]")
    return sum(acceptance ** i for i in range(drafts + 1))


def summarize_speculation(tm: TimingModel, prompt: int, output: int, sequences: int,
                          drafts: int, acceptance: float) -> dict:
    """`wafer sim run --speculate K --acceptance A`: tokens per pass, the verify pass's cost and
    the resulting tok/s per user and pipeline tok/s, against plain decoding at mid context."""
    hw = tm.hw
    t_mid = prompt + max(output // 2, 1)
    per_pass = tokens_per_pass(acceptance, drafts)
    plain = tm.itl_cycles(t_mid, sequences)
    verify = tm.verify_cycles(t_mid, drafts, sequences)
    gap = verify / per_pass
    return {
        "drafts": drafts, "acceptance": acceptance, "tokens_per_pass": per_pass,
        "verify_us": hw.cycles_to_us(verify), "verify_cycles": verify,
        "mean_itl_us": hw.cycles_to_us(gap),
        "tokens_per_s_per_user": hw.clock_hz / gap,
        "pipeline_tokens_per_s": hw.clock_hz / gap * sequences,
        "speedup": plain / gap,
    }


def summarize(tm: TimingModel, prompt: int, output: int, sequences: int = 1, cached: int = 0) -> dict:
    """What `wafer sim run` reports: latency breakdown, tok/s per user, pipeline throughput, TTFT
    (of a prompt whose first `cached` tokens already have KV: a prefix cache's hit)."""
    hw = tm.hw
    dep = tm.departure_cycles(prompt, output, cached, sequences)
    ttft = int(dep[0])
    decode_span = int(dep[-1] - dep[0]) if output > 1 else 0
    mean_itl = decode_span / (output - 1) if output > 1 else float(tm.itl_cycles(prompt + 1, sequences))
    t_mid = prompt + max(output // 2, 1)
    bd = tm.token_breakdown(t_mid)
    per_user = hw.clock_hz / mean_itl
    return {
        "model": tm.shape.name,
        "hardware": hw.name,
        "wafers": tm.plan.n_wafers,
        "prompt": prompt,
        "cached_tokens": min(max(cached, 0), prompt - 1),
        "output": output,
        "sequences": sequences,
        "token_latency_us": hw.cycles_to_us(tm.token_cycles(t_mid)),
        "token_latency_cycles": tm.token_cycles(t_mid),
        "breakdown_cycles": bd,
        "breakdown_context": t_mid,
        "slowest_region_us": hw.cycles_to_us(tm.bottleneck_cycles(t_mid)),
        "mean_itl_us": hw.cycles_to_us(mean_itl),
        "tokens_per_s_per_user": per_user,
        "pipeline_tokens_per_s": per_user * sequences,
        "max_pipeline_tokens_per_s": hw.clock_hz / tm.bottleneck_cycles(t_mid),
        "ttft_us": hw.cycles_to_us(ttft),
        "ttft_cycles": ttft,
        "regions": [{"stage": r.stage.label, "wafer": r.wafer, "rows": r.rows, "cols": r.cols,
                     "cycles": c.fixed_total + c.attention(t_mid)}
                    for r, c in zip(tm.plan.regions, tm.costs)],
    }
