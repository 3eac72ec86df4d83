"""`wafer bench serve` and `wafer bench sessions` against a real server (SmolLM2-135M, emulating a
wafer with --pace none so every token is stamped) on 127.0.0.1, with small bounded loads."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from benches.loadgen import dataset, metrics, runner
from engine.cli.main import main as wafer
from engine.client import AsyncWaferClient
from engine.server.app import ServerOptions
from engine.server.registry import ModelEntry, Registry
from engine.server.testing import ServerThread
from test_loadgen_metrics import VLLM_KEYS

pytestmark = pytest.mark.real_model
TARGET = "wse3:llama-3.1-8b"


@pytest.fixture(scope="module")
def server(real_model_path):
    reg = Registry([ModelEntry(name="smollm2-135m", path=str(real_model_path), max_batch=8, kv_blocks=256),
                    ModelEntry(name="plain", path=str(real_model_path), max_batch=8, kv_blocks=256,
                               prefix_caching=False)], default="smollm2-135m")
    with ServerThread(reg, ServerOptions(port=0, metrics_port=None, emulate=TARGET, pace="none")) as srv:
        yield srv.address


def test_closed_loop_never_exceeds_the_cap(server):
    prompts = dataset.random_prompts(6, 32, 8, vocab_size=49152, seed=1)

    async def go():
        async with AsyncWaferClient(server) as c:
            return await runner.run_load(c, prompts, max_concurrency=2, temperature=0)

    run = asyncio.run(go())
    s = metrics.summarize(run.records, run.duration_s, [99])
    assert s["completed"] == 6 and s["failed"] == 0
    assert run.peak_in_flight == 2                     # the generator reached the cap, never more
    assert s["max_concurrent_requests"] <= 2           # client-side intervals
    assert all(r.usage["max_batch_size"] <= 2 for r in run.records)  # what the server batched
    assert s["input_lens"] == [32] * 6 and all(1 <= n <= 8 for n in s["output_lens"])
    assert all(len(r.itls) == r.n_out - 1 for r in run.records)
    # emulated: the simulated times come from the stamps
    assert s["sim_completed"] == 6 and 0 < s["mean_sim_ttft_ms"] and 0 < s["mean_sim_itl_ms"]


def test_dataset_run_counts_a_refused_request_by_status_and_saves_vllm_json_and_plots(server, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": q}]} for q in ("Name a color.", "Say hi.", "What is 2+2?")]
    lines.insert(1, {"messages": [{"role": "user", "content": "Too long"}], "max_tokens": 100000})
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    rc = wafer(["bench", "serve", "--server", server, "--dataset-path", str(data), "--num-prompts", "4",
                "--output-len", "6", "--temperature", "0", "--max-concurrency", "2", "--goodput", "e2el:600000",
                "--save-result", "--result-dir", str(out), "--result-filename", "r.json", "--plot", "--disable-tqdm"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Failed requests:                         1" in printed and "INVALID_ARGUMENT:" in printed
    assert "Simulated wafer Time to First Token" in printed
    r = json.loads((out / "r.json").read_text())
    assert VLLM_KEYS <= set(r)
    assert (r["completed"], r["failed"], r["errors_by_code"]) == (3, 1, {"INVALID_ARGUMENT": 1})
    assert "max_tokens=100000" in r["errors"][1] and r["output_lens"][1] == 0
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # a 10-minute SLO: all good
    assert r["model_id"] == "smollm2-135m" and r["sim_target"] == TARGET and r["max_concurrency"] == 2
    for png in ("r-latency-vs-throughput.png", "r-latency-cdf.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_open_loop_random_prompts_with_coalesced_chunks(server, capsys):
    rc = wafer(["bench", "serve", "--server", server, "--num-prompts", "6", "--input-len", "16", "--output-len", "8",
                "--request-rate", "20", "--burstiness", "0.5", "--coalesce", "4", "--temperature", "0",
                "--disable-tqdm", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["completed"] == 6 and r["request_rate"] == 20 and r["burstiness"] == 0.5
    assert r["input_lens"] == [16] * 6 and r["coalesce_tokens"] == 4
    for n, itls in zip(r["output_lens"], r["itls"]):
        assert len(itls) == n - 1
        if n >= 4:  # tokens 2-4 came in the first chunk with token 1: ITL 0 by the chunk rule
            assert itls[:3] == [0.0, 0.0, 0.0]
        if n >= 5:
            assert itls[3] > 0  # the next chunk's first token carries the gap


def test_sweep_runs_synchronous_then_throughput_then_rates_between(server, tmp_path, capsys):
    rc = wafer(["bench", "serve", "--server", server, "--sweep", "3", "--num-prompts", "3", "--input-len", "16",
                "--output-len", "4", "--temperature", "0", "--disable-tqdm", "--json", "--save-result",
                "--result-filename", str(tmp_path / "s.json")])
    assert rc == 0
    sync, through, mid = json.loads(capsys.readouterr().out)
    assert [x["label"] for x in (sync, through)] == ["synchronous", "throughput"]
    assert sync["max_concurrency"] == 1 and sync["max_concurrent_requests"] == 1
    assert through["request_rate"] == "inf" and mid["label"].startswith("poisson@")
    lo, hi = sorted([sync["request_throughput"], through["request_throughput"]])
    assert lo <= mid["request_rate"] <= hi
    assert sorted(p.name for p in tmp_path.glob("s-*.json")) == [
        "s-0-synchronous.json", "s-1-throughput.json", f"s-2-{mid['label'].replace('@', '-')}.json"]


def test_sessions_bench_reports_the_three_modes_and_their_ratios(server, capsys):
    rc = wafer(["bench", "sessions", "--server", server, "--turns", "2", "--max-tokens", "6", "--json",
                "--uncached-model", "plain"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    m = r["modes"]
    assert {k: v["failed"] for k, v in m.items()} == {"fresh": 0, "reused": 0, "session": 0, "uncached": 0}
    assert m["uncached"]["cached_tokens_mean"] == 0 and r["same_answers"] == 2
    assert all(v["turns"] == 2 for v in m.values())
    # the session sends only the new message: turn 2 reuses the cached conversation; the
    # stateless modes resend it, and the prefix cache finds it too
    assert m["session"]["cached_tokens_mean"] > 0 and m["fresh"]["cached_tokens_mean"] > 0
    assert m["reused"]["cached_tokens_mean"] > 0
    for pair in ("session/fresh", "reused/fresh", "reused/session"):
        assert set(r["ratios"][pair]) == {"ttft", "roundtrip_overhead", "token_overhead"}
        assert math.isfinite(r["ratios"][pair]["ttft"]) and r["ratios"][pair]["ttft"] > 0
    assert m["session"]["ttft_p50_ms"] > 0 and m["fresh"]["roundtrip_overhead_p50_ms"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--goodput", "itl:5"], "METRIC one of ttft, tpot, e2el"),
    (["--sweep", "1"], "--sweep=1 must be at least 2"),
    (["--max-concurrency", "0"], "--max-concurrency=0"),
    (["--sweep", "3", "--request-rate", "2"], "drop --request-rate"),
    (["--emulate", "wse3:llama-3.1-8b"], "use them with --model"),
])
def test_usage_errors_name_the_flag(args, needle, capsys):
    assert wafer(["bench", "serve", "--server", "127.0.0.1:1", *args]) == 2
    assert needle in capsys.readouterr().err
