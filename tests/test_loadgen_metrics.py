"""The load generator's pure parts on hand-made inputs: metric math (TTFT, ITL inside chunks, TPOT,
E2EL, percentiles, goodput, simulated times), the arrival process, the prompts, the vLLM-keyed
result and the plots."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from benches.loadgen import arrivals, dataset, metrics, plot, report
from benches.loadgen.metrics import RequestRecord
from benches.loadgen.runner import Run, default_label, sweep_rates

MS = 1_000_000  # ns


def rec(i, token_ms, end_ms, start_ms=0, **kw) -> RequestRecord:
    return RequestRecord(i, start_ns=start_ms * MS, end_ns=end_ms * MS, token_ns=[t * MS for t in token_ms], **kw)


def test_one_request_ttft_itl_tpot_e2el():
    r = rec(0, [100, 110, 130], 140, output_len=3)
    assert r.ttft == pytest.approx(0.100)
    assert r.itls == pytest.approx([0.010, 0.020])
    assert r.tpot == pytest.approx((0.140 - 0.100) / 2)
    assert r.e2el == pytest.approx(0.140)
    assert rec(1, [50], 60, output_len=1).tpot is None


def test_a_coalesced_chunk_gives_its_gap_to_its_first_token_and_zero_to_the_rest():
    # chunks of 3 then 2 tokens, arriving at 100 ms and 160 ms
    r = rec(0, [100, 100, 100, 160, 160], 170, output_len=5)
    assert r.itls == pytest.approx([0, 0, 0.060, 0])
    assert metrics.itls_from_chunks([0.100, 0.060], [3, 2]) == pytest.approx(r.itls)
    # one ITL per token after the first; their mean is the request's decode rate
    assert len(r.itls) == r.n_out - 1
    assert np.mean(r.itls) == pytest.approx((0.160 - 0.100) / 4)


def test_summary_statistics_and_failures_by_status():
    ok1 = rec(0, [100, 110, 130], 140, input_len=10, output_len=3, generated_text="abc")
    ok2 = rec(1, [300, 340], 350, start_ms=0, input_len=20, output_len=2)
    bad = RequestRecord(2, input_len=5, start_ns=0, end_ns=5 * MS, error_code="INVALID_ARGUMENT",
                        error="max_tokens=100000 exceeds the model's context of 8192")
    bad2 = RequestRecord(3, error_code="RESOURCE_EXHAUSTED", error="queue full")
    s = metrics.summarize([ok1, ok2, bad, bad2], duration_s=2.0, percentiles=[50, 99, 99.9])
    assert (s["completed"], s["failed"]) == (2, 2)
    assert s["errors_by_code"] == {"INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 1}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 5)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.5)
    assert s["total_token_throughput"] == pytest.approx(17.5)
    assert s["request_goodput"] is None
    # TTFTs 100 and 300 ms: numpy's linear percentiles, population std
    assert s["mean_ttft_ms"] == pytest.approx(200) and s["median_ttft_ms"] == pytest.approx(200)
    assert s["std_ttft_ms"] == pytest.approx(100)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 200)
    assert s["p99.9_ttft_ms"] == pytest.approx(100 + 0.999 * 200)
    assert s["p50_ttft_ms"] == s["median_ttft_ms"]
    # ITLs pooled over requests: 10, 20, 40 ms; TPOTs per request (e2el - ttft) / (n - 1): 20 and 50 ms
    assert s["mean_itl_ms"] == pytest.approx(70 / 3) and s["median_itl_ms"] == pytest.approx(20)
    assert s["mean_tpot_ms"] == pytest.approx(35)
    assert s["mean_e2el_ms"] == pytest.approx(245)
    # per request lists in seconds, failures as zeros and their messages
    assert s["output_lens"] == [3, 2, 0, 0]
    assert s["ttfts"] == pytest.approx([0.1, 0.3, 0, 0])
    assert s["errors"][2].startswith("INVALID_ARGUMENT: max_tokens=100000")
    assert s["max_concurrent_requests"] == 2
    assert "sim_completed" not in s  # nothing emulated


def test_empty_metric_lists_give_zeros_as_vllm():
    s = metrics.summarize([RequestRecord(0, error_code="UNAVAILABLE")], 1.0, [99])
    assert s["completed"] == 0 and s["mean_ttft_ms"] == 0.0 and s["p99_itl_ms"] == 0.0


def test_goodput_counts_requests_meeting_every_slo():
    fast = rec(0, [100, 110, 120], 125, output_len=3)      # ttft 100, tpot 12.5
    slow_start = rec(1, [400, 410, 420], 425, output_len=3)  # ttft 400
    slow_decode = rec(2, [100, 300, 500], 505, output_len=3)  # tpot 202.5
    one_token = rec(3, [150], 160, output_len=1)            # tpot counts as 0
    recs = [fast, slow_start, slow_decode, one_token]
    slo = metrics.parse_goodput(["ttft:200", "tpot:50"])
    assert slo == {"ttft": 200.0, "tpot": 50.0}
    s = metrics.summarize(recs, 4.0, [99], slo)
    assert s["request_goodput"] == pytest.approx(2 / 4.0)  # fast and one_token
    assert metrics.summarize(recs, 4.0, [99], {"e2el": 200})["request_goodput"] == pytest.approx(2 / 4.0)
    for bad, needle in [("ttft", "METRIC:MS"), ("itl:5", "METRIC one of"), ("ttft:x", "not a number"),
                        ("tpot:-1", "positive")]:
        with pytest.raises(ValueError, match=needle):
            metrics.parse_goodput([bad])


def test_peak_concurrency_treats_intervals_as_half_open():
    assert metrics.peak_concurrency([(0, 10), (10, 20)]) == 1
    assert metrics.peak_concurrency([(0, 10), (5, 20), (6, 7)]) == 3


def test_simulated_times_from_stamped_tokens():
    r = rec(0, [100, 101, 140], 150, output_len=3, sim_time_us=[5000, 5100, 5300])
    s = metrics.summarize([r], 1.0, [99])
    assert s["sim_completed"] == 1
    assert s["mean_sim_ttft_ms"] == pytest.approx(5.0)
    assert s["mean_sim_itl_ms"] == pytest.approx(0.15) and s["median_sim_itl_ms"] == pytest.approx(0.15)
    assert s["mean_sim_tpot_ms"] == pytest.approx(0.15)
    assert s["mean_sim_e2el_ms"] == pytest.approx(5.3)


# ------------------------------------------------------------------------------ arrivals


def cv(x):
    return np.std(x) / np.mean(x)


def test_poisson_arrivals_have_the_asked_mean_rate_and_cv_one():
    gaps = arrivals.intervals(20_000, rate=10.0, burstiness=1.0, seed=1)
    assert np.mean(gaps) == pytest.approx(0.1, rel=0.03)
    assert cv(gaps) == pytest.approx(1.0, abs=0.05)


def test_lower_burstiness_means_burstier_arrivals_at_the_same_rate():
    cvs = []
    for b in (0.25, 0.5, 1.0, 4.0):
        gaps = arrivals.intervals(20_000, rate=5.0, burstiness=b, seed=2)
        assert np.mean(gaps) == pytest.approx(0.2, rel=0.05)
        assert cv(gaps) == pytest.approx(1 / math.sqrt(b), rel=0.1)  # gamma: CV = 1/sqrt(shape)
        cvs.append(cv(gaps))
    assert cvs == sorted(cvs, reverse=True)


def test_arrivals_are_seeded_start_at_zero_and_handle_the_limits():
    a = arrivals.arrival_offsets(50, 3.0, 0.5, seed=7)
    assert a == arrivals.arrival_offsets(50, 3.0, 0.5, seed=7)
    assert a != arrivals.arrival_offsets(50, 3.0, 0.5, seed=8)
    assert a[0] == 0 and all(x <= y for x, y in zip(a, a[1:]))
    assert arrivals.arrival_offsets(4, math.inf) == [0, 0, 0, 0]
    assert arrivals.arrival_offsets(3, 2.0, math.inf) == pytest.approx([0, 0.5, 1.0])
    with pytest.raises(ValueError, match="burstiness"):
        arrivals.intervals(3, 1.0, 0)


# ------------------------------------------------------------------------------ prompts


def test_random_prompts_have_exact_lengths_from_the_safe_vocabulary():
    ps = dataset.random_prompts(20, 32, 8, vocab_size=49152, seed=3)
    lo, hi = dataset.safe_id_range(49152)
    assert all(len(p.input["token_ids"]) == p.input_len == 32 and p.max_tokens == 8 for p in ps)
    assert all(lo <= t < hi for p in ps for t in p.input["token_ids"])
    assert ps[0].input != ps[1].input
    assert [p.input for p in dataset.random_prompts(20, 32, 8, 49152, seed=3)] == [p.input for p in ps]
    varied = dataset.random_prompts(200, 100, 10, 49152, range_ratio=0.5, seed=3)
    assert {len(p.input["token_ids"]) for p in varied} <= set(range(50, 151)) and len({p.input_len for p in varied}) > 20


def test_jsonl_dataset_cycles_and_names_a_bad_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}\n\n'
                 '{"messages": [{"role": "user", "content": "yo"}]}\n')
    ps = dataset.load_jsonl(f, 5, output_len=7)
    assert [p.input["messages"][0]["content"] for p in ps] == ["hi", "yo", "hi", "yo", "hi"]
    assert [p.max_tokens for p in ps] == [5, 7, 5, 7, 5]
    f.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected"):
        dataset.load_jsonl(f, 1)


# ------------------------------------------------------------------------------ result, plots


VLLM_KEYS = {
    "date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts", "request_rate",
    "burstiness", "max_concurrency", "duration", "completed", "failed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "request_goodput", "output_throughput",
    "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests", "input_lens",
    "output_lens", "ttfts", "itls", "latencies", "generated_texts", "errors",
} | {f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el")}


def hand_run(label="throughput", rate=math.inf, shift=0):
    recs = [rec(i, [100 + shift + i, 120 + shift + i, 125 + 2 * shift + i], 130 + 2 * shift + i,
                input_len=8, output_len=3) for i in range(4)]
    return Run(label, rate, 1.0, None, recs, duration_s=0.5 + shift / 100, peak_in_flight=4)


def test_result_json_has_the_vllm_keys_and_is_json():
    r = report.result_json(hand_run(), model_id="smollm2-135m", server="x:1", percentiles=[99], goodput_ms={"ttft": 150})
    assert VLLM_KEYS <= set(r)
    assert r["request_rate"] == "inf" and r["request_goodput"] == pytest.approx(4 / 0.5)
    assert json.loads(json.dumps(r))["p99_itl_ms"] == r["p99_itl_ms"]
    out = io.StringIO()
    report.print_result(r, out)
    assert "Request goodput (req/s) [ttft:150]" in out.getvalue() and "P99 ITL (ms)" in out.getvalue()
    assert report.result_path("d", None, r).name.startswith("wafer-grpc-infqps-smollm2-135m-")
    assert report.result_path(None, "x.json", r, 2).name == "x-2-throughput.json"


def test_sweep_rates_lie_between_synchronous_and_throughput():
    assert sweep_rates(1.0, 4.0, 5) == pytest.approx([1.75, 2.5, 3.25])
    assert sweep_rates(1.0, 4.0, 2) == []
    assert default_label(math.inf, 1, 1) == "synchronous"
    assert default_label(2.0, 0.5, 4) == "gamma0.5@2.00, concurrency 4"


def test_plots_are_written(tmp_path):
    runs = [hand_run("synchronous", shift=0), hand_run("poisson@2.00", 2.0, shift=20), hand_run(shift=40)]
    results = [report.result_json(r, model_id="m", server="s", percentiles=[90, 99]) for r in runs]
    paths = plot.plot_results(results, tmp_path, "run")
    assert [p.name for p in paths] == ["run-latency-vs-throughput.png", "run-latency-cdf.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
