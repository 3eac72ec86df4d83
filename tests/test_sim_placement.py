"""Placement invariants (hypothesis) and the does-not-fit errors."""

import dataclasses

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sim.hardware import PRESETS as HW
from sim.placement import PlacementError, model_stages, plan
from sim.shapes import ModelShape, get_shape

# A small wafer so that small random models need several wafers and plans stay fast.
SMALL_HW = dataclasses.replace(HW["wse3"], name="small", pe_rows=48, pe_cols=64, wafers_per_system=64)

# derandomize: the same examples every run, so CI never flips on a new random draw
HYP = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def shapes(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([16, 32, 64]))
    return ModelShape(
        name="random",
        n_layers=draw(st.integers(1, 24)),
        d_model=draw(st.sampled_from([128, 256, 384, 512])),
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_ffn=draw(st.sampled_from([256, 512, 1024, 1536])),
        vocab_size=draw(st.integers(256, 8000)),
        tied_embeddings=draw(st.booleans()),
        context_length=4096,
        bytes_per_weight=draw(st.sampled_from([1.0, 2.0])),
    )


def _try(shape, hw, context, batch=1, wafers=None):
    try:
        return plan(shape, hw, context, batch, wafers)
    except PlacementError:
        return None


def _check_layout(p):
    hw = p.hw
    stages = model_stages(p.shape)
    # every stage placed exactly once, in order, wafers consecutive
    assert [r.stage for r in p.regions] == stages
    wafers = [r.wafer for r in p.regions]
    assert wafers == sorted(wafers) and set(wafers) == set(range(p.n_wafers))
    assert p.max_pe_bytes() <= hw.sram_bytes_per_pe
    for w in p.wafers:
        cells = set()
        for r in w.regions:
            assert 0 <= r.row0 and r.row0 + r.rows <= hw.pe_rows
            assert 0 <= r.col0 and r.col0 + r.cols <= hw.pe_cols
            assert r.pes * hw.data_bytes_per_pe >= r.stage.data_bytes(p.kv_tokens)
            for cell in ((r.row0, r.col0), (r.row0 + r.rows - 1, r.col0 + r.cols - 1)):
                assert cell not in cells
            cells.update({(r.row0, r.col0), (r.row0 + r.rows - 1, r.col0 + r.cols - 1)})
        # consecutive regions on a wafer share an edge (serpentine)
        for a, b in zip(w.regions, w.regions[1:]):
            side = a.row0 == b.row0 and (a.col0 + a.cols == b.col0 or b.col0 + b.cols == a.col0)
            below = (b.row0 == a.row0 + a.rows and a.col0 < b.col0 + b.cols and b.col0 < a.col0 + a.cols)
            assert side or below, (a, b)
        # regions on one wafer do not overlap (band rows x column intervals)
        by_band = {}
        for r in w.regions:
            by_band.setdefault(r.row0, []).append((r.col0, r.col0 + r.cols))
        for spans in by_band.values():
            spans.sort()
            assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:]))


@HYP
@given(shapes(), st.integers(1, 4096), st.integers(1, 4))
def test_every_stage_placed_once_and_no_pe_over_sram(shape, context, batch):
    p = _try(shape, SMALL_HW, context, batch)
    assume(p is not None)
    _check_layout(p)


@HYP
@given(shapes(), st.integers(1, 2048), st.integers(1, 2048))
def test_more_context_never_raises_kv_capacity(shape, c1, c2):
    lo, hi = sorted((c1, c2))
    p_hi = _try(shape, SMALL_HW, hi)
    assume(p_hi is not None)
    p_lo = plan(shape, SMALL_HW, lo, wafers=p_hi.n_wafers)  # a smaller context fits what a larger did
    assert p_hi.kv_capacity_tokens <= p_lo.kv_capacity_tokens
    assert p_hi.kv_capacity_tokens // hi <= p_lo.kv_capacity_tokens // lo


@HYP
@given(shapes(), st.integers(1, 2048), st.integers(1, 3))
def test_more_wafers_never_makes_a_fitting_model_not_fit(shape, context, extra):
    p = _try(shape, SMALL_HW, context)
    assume(p is not None)
    n = min(p.n_wafers + extra, len(model_stages(shape)))
    bigger = plan(shape, SMALL_HW, context, wafers=n)
    assert bigger.n_wafers == n
    _check_layout(bigger)


def test_public_deployments_wafer_counts():
    assert plan(get_shape("llama-3.1-8b"), HW["wse3"]).n_wafers == 1
    assert plan(get_shape("llama-3.1-70b"), HW["wse3"]).n_wafers == 4
    # 8-bit halves the weights: 70B fits in fewer wafers
    assert plan(get_shape("llama-3.1-70b", 8), HW["wse3"]).n_wafers == 2


def test_plan_reports_sram_split_per_wafer():
    p = plan(get_shape("llama-3.1-70b"), HW["wse3"], 8192, 2)
    d = p.to_dict()
    assert sum(w["weights_gb"] for w in d["per_wafer"]) == pytest.approx(p.shape.weight_bytes / 1e9)
    assert sum(w["kv_gb"] for w in d["per_wafer"]) == pytest.approx(p.shape.kv_bytes_per_token * 8192 * 2 / 1e9)
    assert d["kv_capacity_tokens"] >= 8192 * 2
    assert all(w["buffers_gb"] > 0 for w in d["per_wafer"])


def test_a_layer_too_big_for_a_wafer_says_what_and_by_how_much():
    with pytest.raises(PlacementError) as e:
        plan(get_shape("llama-3.1-405b"), HW["wse3"], 131072, 128)
    msg = str(e.value)
    assert msg.startswith("L0 needs") and "KV" in msg and "short by" in msg
    assert e.value.kv_bound  # the weights alone fit: less KV would help (the CLI names its flags)


def test_forcing_zero_wafers_says_so():
    with pytest.raises(PlacementError, match="wafers=0 must be >= 1"):
        plan(get_shape("llama-3.1-8b"), HW["wse3"], wafers=0)


def test_pes_per_layer_is_a_list_per_wafer_for_one_or_many_wafers():
    for name, n in (("llama-3.1-8b", 1), ("llama-3.1-70b", 4)):
        d = plan(get_shape(name), HW["wse3"]).to_dict()
        assert len(d["pes_per_layer"]) == n and all(isinstance(x, int) for x in d["pes_per_layer"])


def test_beyond_the_system_maximum_says_by_how_much():
    hw = dataclasses.replace(HW["wse3"], wafers_per_system=2)
    with pytest.raises(PlacementError) as e:
        plan(get_shape("llama-3.1-70b"), hw)
    msg = str(e.value)
    assert "more than 2 wse3 wafers" in msg and "short by at least" in msg
    # the shortfall is the real one: 141 GB of weights vs ~82 GB of data SRAM on two wafers
    short = float(msg.split("short by at least ")[1].split(" GB")[0])
    assert 55 < short < 70


def test_forcing_too_few_wafers_is_an_error():
    with pytest.raises(PlacementError, match="needs 4 wse3 wafers"):
        plan(get_shape("llama-3.1-70b"), HW["wse3"], wafers=3)


def test_context_beyond_the_model_is_an_error():
    with pytest.raises(PlacementError, match="exceeds smollm2-135m's context of 8192"):
        plan(get_shape("smollm2-135m"), HW["wse3"], 10000)
