"""A run's result as `vllm bench serve` writes it (same keys, so scripts that read vLLM's JSON read
ours), the human-readable table, and the file writer.

Keys as vLLM's: date, endpoint_type, backend, label, model_id, tokenizer_id, num_prompts,
request_rate ("inf" when unbounded), burstiness, max_concurrency, duration, completed, failed,
total_input_tokens, total_output_tokens, request_throughput, request_goodput (None without
--goodput), output_throughput, total_token_throughput, max_output_tokens_per_s,
max_concurrent_requests, {mean,median,std,pXX}_{ttft,tpot,itl,e2el}_ms, and per request
input_lens, output_lens, ttfts, itls (seconds), latencies, generated_texts, errors.
Ours besides (absent from vLLM's): errors_by_code ({"INVALID_ARGUMENT": 2}), goodput_slo_ms,
peak_in_flight, coalesce_tokens, server, and sim_* ({mean,median,std,pXX}_sim_{ttft,tpot,itl,e2el}_ms,
sim_completed, sim_target) when the server emulates a wafer.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from benches.loadgen.metrics import percentile_word, summarize
from benches.loadgen.runner import Run

BACKEND = "wafer-grpc"


def result_json(run: Run, *, model_id: str, server: str, percentiles=(99,), goodput_ms=None,
                coalesce: int = 1, sim_target: str = "", extra: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": BACKEND,
        "backend": BACKEND,
        "label": run.label,
        "model_id": model_id,
        "tokenizer_id": model_id,
        "num_prompts": len(run.records),
        "request_rate": "inf" if math.isinf(run.request_rate) else run.request_rate,
        "burstiness": run.burstiness,
        "max_concurrency": run.max_concurrency,
    }
    out.update(summarize(run.records, run.duration_s, percentiles, goodput_ms))
    out.update({"peak_in_flight": run.peak_in_flight, "coalesce_tokens": coalesce, "server": server})
    if sim_target and "sim_completed" in out:
        out["sim_target"] = sim_target
    out.update(extra or {})
    return out


def _line(f: TextIO, name: str, value) -> None:
    print(f"{name:<40} {value:<10.2f}" if isinstance(value, float) else f"{name:<40} {value}", file=f)


HEADERS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency (per token)"), "e2el": ("E2EL", "End-to-end Latency")}


def print_result(r: dict[str, Any], f: TextIO) -> None:
    """The table `vllm bench serve` prints, plus failures by status and the simulated times."""
    print(f"{' Serving Benchmark Result (' + r['label'] + ') ':=^60}", file=f)
    _line(f, "Successful requests:", r["completed"])
    _line(f, "Failed requests:", r["failed"])
    for code, n in sorted(r["errors_by_code"].items()):
        _line(f, f"  {code}:", n)
    if r["max_concurrency"] is not None:
        _line(f, "Maximum request concurrency:", r["max_concurrency"])
    if r["request_rate"] != "inf":
        _line(f, "Request rate configured (RPS):", float(r["request_rate"]))
        _line(f, "Burstiness:", float(r["burstiness"]))
    _line(f, "Benchmark duration (s):", float(r["duration"]))
    _line(f, "Total input tokens:", r["total_input_tokens"])
    _line(f, "Total generated tokens:", r["total_output_tokens"])
    _line(f, "Request throughput (req/s):", r["request_throughput"])
    if r["request_goodput"] is not None:
        slo = " ".join(f"{k}:{v:g}" for k, v in r["goodput_slo_ms"].items())
        _line(f, f"Request goodput (req/s) [{slo}]:", r["request_goodput"])
    _line(f, "Output token throughput (tok/s):", r["output_throughput"])
    _line(f, "Peak output token throughput (tok/s):", r["max_output_tokens_per_s"])
    _line(f, "Peak concurrent requests:", r["max_concurrent_requests"])
    _line(f, "Total token throughput (tok/s):", r["total_token_throughput"])
    for prefix, title in (("", ""), ("sim_", "Simulated wafer ")):
        if prefix and "sim_completed" not in r:
            continue
        for m, (short, header) in HEADERS.items():
            name = prefix + m
            print(f"{(' ' + title + header + ' ').replace('  ', ' '):-^60}", file=f)
            for key, label in _stat_keys(r, name):
                _line(f, f"{label} {'sim ' if prefix else ''}{short} (ms):", r[key])
    print("=" * 60, file=f)


def _stat_keys(r: dict, name: str) -> list[tuple[str, str]]:
    keys = [(f"mean_{name}_ms", "Mean"), (f"median_{name}_ms", "Median"), (f"std_{name}_ms", "Std")]
    pat = re.compile(rf"^p([0-9.]+)_{name}_ms$")
    keys += sorted(((k, f"P{m.group(1)}") for k in r if (m := pat.match(k))), key=lambda kv: float(kv[1][1:]))
    return keys


def print_sweep(results: list[dict[str, Any]], f: TextIO) -> None:
    print(f"{'run':<28}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'TPOT p50':>10}{'ITL p99':>9}"
          f"{'E2EL p50':>10}{'failed':>8}", file=f)
    for r in results:
        p99 = r.get("p99_itl_ms", float("nan"))
        print(f"{r['label']:<28}{r['request_throughput']:>8.2f}{r['output_throughput']:>9.1f}"
              f"{r['median_ttft_ms']:>10.1f}{r['median_tpot_ms']:>10.1f}{p99:>9.1f}"
              f"{r['median_e2el_ms']:>10.1f}{r['failed']:>8}", file=f)


def result_path(directory: str | None, filename: str | None, result: dict, index: int | None = None) -> Path:
    """vLLM's default name: <backend>-<rate>qps[-concurrency<N>]-<model>-<date>.json; in a sweep
    each run's file gets -<k>-<label>."""
    if filename:
        p = Path(filename)
        if index is not None:
            p = p.with_name(f"{p.stem}-{index}-{_slug(result['label'])}{p.suffix or '.json'}")
    else:
        conc = f"-concurrency{result['max_concurrency']}" if result["max_concurrency"] else ""
        sweep = f"-{index}-{_slug(result['label'])}" if index is not None else ""
        rate = result["request_rate"] if result["request_rate"] == "inf" else f"{result['request_rate']:.2f}"
        p = Path(f"{BACKEND}-{rate}qps{conc}-{_slug(result['model_id'])}-{result['date']}{sweep}.json")
    return Path(directory) / p if directory else p


def plot_stem(filename: str | None, results: list[dict]) -> str:
    """The plots' file name stem: --result-filename's, else the run's (a sweep's: -sweep-)."""
    if filename or len(results) == 1:
        return result_path(None, filename, results[0]).stem
    r = results[0]
    return f"{BACKEND}-sweep-{_slug(r['model_id'])}-{r['date']}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")


def write_result(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
