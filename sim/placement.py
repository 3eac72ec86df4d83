"""Placement: weights-stationary, layer-pipelined.

Every stage of the model (the embedding, each transformer layer, the output head; one
`embed_head` stage when the embedding is tied) gets a rectangle of PEs holding its weights and,
for layers, the KV cache for `context x batch` tokens. A region starts as small as the SRAM
allows (fewest hops to reduce over; this decides fit and wafer count); where the wafer has room
left it is then widened towards the width the cost model finds fastest, since a wider region
shares the GEMV among more PEs at the price of longer reductions along its rows.

Layout on a wafer: the grid is cut into bands of equal height; regions (all one band high) run
left to right in even bands and right to left in odd ones (serpentine), so consecutive stages
are neighbours and a band turn is a vertical neighbour. The band height is chosen per wafer to
make regions as square as possible (least `rows + cols` summed over regions).

Wafers: consecutive stages per wafer. The minimum wafer count comes from filling each wafer
in order as far as the packing allows; the stages are then re-split over that many wafers to
balance bytes when that still packs.

SRAM per PE = reserved (code) + working buffers + ceil((weights + KV) / PEs). KV capacity is what
the plan's wafers could hold if every PE's data SRAM not taken by weights went to KV cache.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from sim.costs import region_cycles
from sim.hardware import HardwareSpec
from sim.shapes import ModelShape

log = logging.getLogger(__name__)

GB = 1e9


class PlacementError(ValueError):
    """The model does not fit; the message says what and by how much. `kv_bound` is True when
    the weights alone would fit, so a smaller KV reservation (context x batch) may help."""

    def __init__(self, message: str, kv_bound: bool = False):
        super().__init__(message)
        self.kv_bound = kv_bound


@dataclass(frozen=True)
class Stage:
    """One unit of the pipeline: `kind` is embed, layer, head or embed_head."""

    index: int
    kind: str
    layer: int | None
    weight_bytes: float
    kv_bytes_per_token: float

    @property
    def label(self) -> str:
        return f"L{self.layer}" if self.kind == "layer" else self.kind

    def data_bytes(self, kv_tokens: int) -> float:
        return self.weight_bytes + self.kv_bytes_per_token * kv_tokens


def model_stages(shape: ModelShape) -> list[Stage]:
    bpw = shape.bytes_per_weight
    out: list[Stage] = []
    if shape.tied_embeddings:
        out.append(Stage(0, "embed_head", None, (shape.embedding_params + shape.head_params) * bpw, 0.0))
    else:
        out.append(Stage(0, "embed", None, shape.embedding_params * bpw, 0.0))
    for i in range(shape.n_layers):
        out.append(Stage(len(out), "layer", i, shape.layer_params * bpw,
                         shape.kv_bytes_per_token_per_layer))
    if not shape.tied_embeddings:
        out.append(Stage(len(out), "head", None, shape.head_params * bpw, 0.0))
    return out


@dataclass(frozen=True)
class Region:
    stage: Stage
    wafer: int
    row0: int
    col0: int
    rows: int
    cols: int
    weight_bytes_per_pe: int
    kv_bytes_per_pe: int

    @property
    def pes(self) -> int:
        return self.rows * self.cols


@dataclass
class WaferPlan:
    index: int
    band_rows: int
    regions: list[Region]
    pes_total: int
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    buffer_bytes: float = 0.0
    reserved_bytes: float = 0.0
    kv_capacity_tokens: int | None = None  # None: no KV on this wafer

    @property
    def pes_used(self) -> int:
        return sum(r.pes for r in self.regions)

    @property
    def pes_per_layer(self) -> int | None:
        """PEs of a layer region on this wafer (all get the same size), None without layers."""
        return next((r.pes for r in self.regions if r.stage.kind == "layer"), None)


@dataclass
class Plan:
    shape: ModelShape
    hw: HardwareSpec
    context: int
    batch: int
    wafers: list[WaferPlan]
    kv_capacity_tokens: int
    regions: list[Region] = field(default_factory=list)

    @property
    def n_wafers(self) -> int:
        return len(self.wafers)

    @property
    def kv_tokens(self) -> int:
        return self.context * self.batch

    def max_pe_bytes(self) -> int:
        hw = self.hw
        return max(hw.reserved_bytes_per_pe + hw.buffer_bytes_per_pe + r.weight_bytes_per_pe
                   + r.kv_bytes_per_pe for r in self.regions)

    def to_dict(self) -> dict:
        """What `wafer sim plan --json` prints. `precision_bits` is bits per weight (fractional
        for GGUF block formats: 5.0 for Q4_1); `pes_per_layer` is a list with one entry per
        wafer, the PEs of each layer region on it (all layers on a wafer get the same size), or
        None for a wafer that holds no layer."""
        return {
            "model": self.shape.name,
            "hardware": self.hw.name,
            "precision_bits": self.shape.bytes_per_weight * 8,
            "context": self.context,
            "batch": self.batch,
            "wafers": self.n_wafers,
            "weights_gb": self.shape.weight_bytes / GB,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_sequences_at_context": self.kv_capacity_tokens // self.context,
            "pes_per_layer": [w.pes_per_layer for w in self.wafers],
            "max_sram_bytes_per_pe": self.max_pe_bytes(),
            "per_wafer": [
                {
                    "wafer": w.index,
                    "stages": [r.stage.label for r in w.regions],
                    "band_rows": w.band_rows,
                    "pes_used": w.pes_used,
                    "pes_total": w.pes_total,
                    "weights_gb": w.weight_bytes / GB,
                    "kv_gb": w.kv_bytes / GB,
                    "buffers_gb": w.buffer_bytes / GB,
                    "reserved_gb": w.reserved_bytes / GB,
                    "kv_capacity_tokens": w.kv_capacity_tokens,
                }
                for w in self.wafers
            ],
            "regions": [
                {"stage": r.stage.label, "wafer": r.wafer, "row": r.row0, "col": r.col0,
                 "rows": r.rows, "cols": r.cols, "pes": r.pes,
                 "weight_bytes_per_pe": r.weight_bytes_per_pe, "kv_bytes_per_pe": r.kv_bytes_per_pe}
                for r in self.regions
            ],
        }


# --- packing one wafer -----------------------------------------------------------------------

def _min_pes(nbytes: float, hw: HardwareSpec) -> int:
    return max(1, math.ceil(nbytes / hw.data_bytes_per_pe))


def _band_layout(widths: list[int], band_rows: int, hw: HardwareSpec) -> list[tuple[int, int]] | None:
    """(row0, col0) per region in serpentine next-fit order, or None if they do not fit."""
    n_bands = hw.pe_rows // band_rows
    band, used, out = 0, 0, []
    for w in widths:
        if w > hw.pe_cols:
            return None
        if used + w > hw.pe_cols:
            band, used = band + 1, 0
        if band >= n_bands:
            return None
        col0 = used if band % 2 == 0 else hw.pe_cols - used - w
        out.append((band * band_rows, col0))
        used += w
    return out


def _band_heights(hw: HardwareSpec) -> list[int]:
    return sorted({hw.pe_rows // nb for nb in range(1, min(hw.pe_rows, 128) + 1)}, reverse=True)


def _fastest_width(shape: ModelShape, hw: HardwareSpec, kind: str, rows: int, w_min: int, t: int) -> int:
    """The region width in [w_min, 4 w_min] with the fewest cycles per token: wider regions cut
    each PE's GEMV share but lengthen the reductions along the row."""
    hi = min(hw.pe_cols, 4 * w_min)
    return min(range(w_min, hi + 1), key=lambda w: (region_cycles(hw, shape, kind, rows, w, t), w))


def _widen(stages: list[Stage], widths: list[int], h: int, hw: HardwareSpec, shape: ModelShape,
           context: int) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Widths grown towards each stage's fastest width as far as the wafer allows."""
    cache: dict[tuple, int] = {}
    best = []
    for st, w in zip(stages, widths):
        key = (st.kind, w)
        if key not in cache:
            cache[key] = _fastest_width(shape, hw, st.kind, h, w, context)
        best.append(cache[key])
    if best == widths:
        return None
    lo, hi, found = 0.0, 1.0, None
    for _ in range(12):  # largest blend between the minimum and the fastest widths that packs
        mid = hi if found is None and lo == 0.0 and hi == 1.0 else (lo + hi) / 2
        trial = [w + int(mid * (b - w)) for w, b in zip(widths, best)]
        spots = _band_layout(trial, h, hw)
        if spots is not None:
            found, lo = (trial, spots), mid
            if mid == 1.0:
                break
        else:
            hi = mid
    return found


def pack_wafer(stages: list[Stage], kv_tokens: int, hw: HardwareSpec, wafer: int = 0,
               shape: ModelShape | None = None, context: int = 1) -> WaferPlan | None:
    """Lay `stages` out on one wafer, or None when they do not fit. With `shape`, regions are
    then widened towards their fastest width (at `context`) where the wafer has room."""
    pes = [_min_pes(s.data_bytes(kv_tokens), hw) for s in stages]
    if sum(pes) > hw.pes_per_wafer:
        return None
    best = None
    for h in _band_heights(hw):
        widths = [math.ceil(p / h) for p in pes]
        spots = _band_layout(widths, h, hw)
        if spots is None:
            continue
        score = sum(h + w for w in widths)
        if best is None or score < best[0]:
            best = (score, h, widths, spots)
    if best is None:
        return None
    _, h, widths, spots = best
    if shape is not None:
        wider = _widen(stages, widths, h, hw, shape, context)
        if wider is not None:
            widths, spots = wider
    regions = []
    for s, w, (r0, c0) in zip(stages, widths, spots):
        n = h * w
        regions.append(Region(s, wafer, r0, c0, h, w, math.ceil(s.weight_bytes / n),
                              math.ceil(s.kv_bytes_per_token * kv_tokens / n)))
    wp = WaferPlan(wafer, h, regions, hw.pes_per_wafer)
    used = wp.pes_used
    wp.weight_bytes = sum(s.weight_bytes for s in stages)
    wp.kv_bytes = sum(s.kv_bytes_per_token for s in stages) * kv_tokens
    wp.buffer_bytes = used * hw.buffer_bytes_per_pe
    wp.reserved_bytes = used * hw.reserved_bytes_per_pe
    kv_per_token = sum(s.kv_bytes_per_token for s in stages)
    if kv_per_token > 0:
        free = hw.pes_per_wafer * hw.data_bytes_per_pe - wp.weight_bytes
        wp.kv_capacity_tokens = int(free // kv_per_token)
    return wp


# --- splitting over wafers -------------------------------------------------------------------

def _fill_count(stages: list[Stage], start: int, kv_tokens: int, hw: HardwareSpec) -> int:
    """How many stages from `start` on fit one wafer (packing feasibility is prefix-monotone)."""
    lo, hi = 0, len(stages) - start
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if pack_wafer(stages[start:start + mid], kv_tokens, hw) is not None:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _greedy_groups(stages: list[Stage], kv_tokens: int, hw: HardwareSpec) -> list[list[Stage]]:
    groups, i = [], 0
    while i < len(stages):
        n = _fill_count(stages, i, kv_tokens, hw)
        if n == 0:
            _raise_stage_too_big(stages[i], kv_tokens, hw)
        groups.append(stages[i:i + n])
        i += n
        if len(groups) > hw.wafers_per_system:
            break
    return groups


def _balanced_groups(stages: list[Stage], n: int, kv_tokens: int) -> list[list[Stage]]:
    """Consecutive split into n groups minimising the largest group's bytes (greedy + bisection)."""
    sizes = [s.data_bytes(kv_tokens) for s in stages]

    def split(cap: float) -> list[list[Stage]] | None:
        groups, cur, acc = [], [], 0.0
        for s, b in zip(stages, sizes):
            if cur and acc + b > cap:
                groups.append(cur)
                cur, acc = [], 0.0
            cur.append(s)
            acc += b
        groups.append(cur)
        return groups if len(groups) <= n else None

    lo, hi = max(sizes), sum(sizes)
    for _ in range(60):
        mid = (lo + hi) / 2
        if split(mid) is None:
            lo = mid
        else:
            hi = mid
    groups = split(hi)
    return _split_to(groups, n)


def _split_to(groups: list[list[Stage]], n: int) -> list[list[Stage]]:
    """Split the heaviest splittable group (prefix/suffix keep packing feasible) until n groups."""
    groups = [list(g) for g in groups]
    while len(groups) < n:
        i = max((i for i, g in enumerate(groups) if len(g) > 1),
                key=lambda i: sum(s.weight_bytes for s in groups[i]))
        g = groups[i]
        half = len(g) // 2
        groups[i:i + 1] = [g[:half], g[half:]]
    return groups


def _raise_stage_too_big(stage: Stage, kv_tokens: int, hw: HardwareSpec) -> None:
    need = stage.data_bytes(kv_tokens)
    have = hw.pes_per_wafer * hw.data_bytes_per_pe
    kv = stage.kv_bytes_per_token * kv_tokens
    raise PlacementError(
        f"{stage.label} needs {need / GB:.2f} GB of SRAM (weights {stage.weight_bytes / GB:.2f} GB"
        f" + KV {kv / GB:.2f} GB for {kv_tokens} tokens) but one {hw.name} wafer holds "
        f"{have / GB:.2f} GB for data; short by {(need - have) / GB:.2f} GB",
        kv_bound=kv > 0 and stage.weight_bytes <= have)


def plan(shape: ModelShape, hw: HardwareSpec, context: int = 8192, batch: int = 1,
         wafers: int | None = None) -> Plan:
    """Place `shape` for `batch` sequences of `context` tokens; `wafers` forces a wafer count
    (at least the minimum). Raises PlacementError when it cannot fit."""
    for name, v in (("context", context), ("batch", batch), ("wafers", wafers)):
        if v is not None and v < 1:
            raise PlacementError(f"{name}={v} must be >= 1")
    if context > shape.context_length:
        raise PlacementError(f"context={context} exceeds {shape.name}'s context of "
                             f"{shape.context_length}")
    kv_tokens = context * batch
    stages = model_stages(shape)
    greedy = _greedy_groups(stages, kv_tokens, hw)
    n_min = len(greedy)
    if n_min > hw.wafers_per_system:
        total = sum(s.data_bytes(kv_tokens) for s in stages)
        have = hw.wafers_per_system * hw.pes_per_wafer * hw.data_bytes_per_pe
        raise PlacementError(
            f"{shape.name} needs {total / GB:.1f} GB (weights {shape.weight_bytes / GB:.1f} GB + "
            f"KV {shape.kv_bytes_per_token * kv_tokens / GB:.1f} GB) and more than "
            f"{hw.wafers_per_system} {hw.name} wafers ({have / GB:.1f} GB for data); "
            + (f"short by at least {(total - have) / GB:.1f} GB" if total > have else
               "whole regions per wafer leave too much of each wafer unused"),
            kv_bound=shape.weight_bytes <= have)
    n = n_min if wafers is None else wafers
    if n < n_min:
        raise PlacementError(f"{shape.name} with context {context} x batch {batch} needs "
                             f"{n_min} {hw.name} wafers; wafers={wafers} is too few")
    if n > min(len(stages), hw.wafers_per_system):
        raise PlacementError(f"wafers={n} exceeds the {len(stages)} pipeline stages of "
                             f"{shape.name} or the system maximum of {hw.wafers_per_system}")
    packed = [pack_wafer(g, kv_tokens, hw, i, shape, context)
              for i, g in enumerate(_balanced_groups(stages, n, kv_tokens))]
    if any(p is None for p in packed):
        log.debug("balanced split does not pack; splitting the greedy fill instead")
        packed = [pack_wafer(g, kv_tokens, hw, i, shape, context) for i, g in enumerate(_split_to(greedy, n))]
    assert all(p is not None for p in packed), "prefix/suffix splits of packed groups must pack"
    caps = [p.kv_capacity_tokens for p in packed if p.kv_capacity_tokens is not None]
    regions = [r for p in packed for r in p.regions]
    return Plan(shape, hw, context, batch, packed, min(caps), regions)
