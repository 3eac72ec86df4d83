"""`wafer sim ...` through the real dispatcher: JSON parses, errors are one line and non-zero."""

import json
import subprocess
import sys

import pytest

from sim import cli as sim_cli
from sim.shapes import get_shape


def run(argv, capsys):
    code = sim_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json(capsys):
    code, out, err = run(["plan", "--model", "llama-3.1-70b", "--hw", "wse3", "--json"], capsys)
    assert code == 0 and err == ""
    d = json.loads(out)
    assert d["wafers"] == 4 and d["kv_capacity_tokens"] >= 8192
    assert len(d["per_wafer"]) == 4 and {"weights_gb", "kv_gb", "buffers_gb"} <= set(d["per_wafer"][0])
    assert d["max_sram_bytes_per_pe"] <= 49152


def test_plan_table(capsys):
    code, out, _ = run(["plan", "--model", "llama-3.1-8b", "--context", "4096", "--batch", "4"], capsys)
    assert code == 0 and "1 wafer(s)" in out and "KV capacity" in out and "PEs per layer" in out


def test_run_json(capsys):
    code, out, _ = run(["run", "--model", "llama-3.1-8b", "--prompt", "128", "--output", "16",
                        "--sequences", "2", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["sequences"] == 2
    assert sum(d["breakdown_cycles"].values()) == d["token_latency_cycles"]
    assert d["pipeline_tokens_per_s"] == pytest.approx(2 * d["tokens_per_s_per_user"])


def test_trace_json(capsys):
    code, out, _ = run(["trace", "--model", "llama-3.2-1b", "--requests", "20", "--rate", "100",
                        "--prompt", "64", "--output", "8", "--seed", "1", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["requests"] == 20 and len(d["per_request"]) == 20


def test_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    code, out, _ = run(["plot", "--model", "llama-3.1-70b", "-o", str(png)], capsys)
    assert code == 0 and png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["plan", "--model", "llama-3.1-405b", "--context", "131072", "--batch", "128"], "short by"),
    (["plan", "--model", "llama-3.1-70b", "--wafers", "2"], "needs 4 wse3 wafers"),
    (["run", "--model", "smollm2-135m", "--prompt", "8000", "--output", "500"], "exceeds"),
    (["run", "--model", "llama-3.1-8b", "--sequences", "0"], "--sequences=0 must be >= 1"),
    (["plan", "--model", "llama-3.1-8b", "--hw", "tpu"], "unknown hardware 'tpu'"),
    (["plan", "--model", "model.gguf"], "needs the engine's loader"),
])
def test_errors_are_one_line_and_nonzero(argv, needle, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("wafer sim: error: ") and needle in err


def test_hw_config_and_unknown_key(tmp_path, capsys):
    good = tmp_path / "slow.toml"
    good.write_text("reduce_stage_cycles = 48\n")
    base = json.loads(run(["run", "--model", "llama-3.1-8b", "--json"], capsys)[1])
    slow = json.loads(run(["run", "--model", "llama-3.1-8b", "--hw-config", str(good), "--json"], capsys)[1])
    assert slow["tokens_per_s_per_user"] < base["tokens_per_s_per_user"]
    bad = tmp_path / "bad.toml"
    bad.write_text("reduce_stage = 48\n")
    code, _, err = run(["plan", "--model", "llama-3.1-8b", "--hw-config", str(bad)], capsys)
    assert code == 2 and "unknown hardware key(s) reduce_stage" in err


def test_gguf_goes_through_the_engine_loader(capsys):
    import argparse

    seen = []

    def loader(path):
        seen.append(path)
        return get_shape("smollm2-135m")

    parser = argparse.ArgumentParser()
    sim_cli.add_parsers(parser.add_subparsers(dest="command"), load_gguf_shape=loader)
    args = parser.parse_args(["sim", "plan", "--model", "/m/smol.gguf", "--json"])
    assert args.func(args) == 0
    assert seen == ["/m/smol.gguf"] and json.loads(capsys.readouterr().out)["model"] == "smollm2-135m"


def test_wafer_entry_point_dispatches_sim():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "sim", "plan", "--model", "llama-3.2-1b",
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["wafers"] == 1


def test_sweep_shows_context_and_sequences_tradeoff(capsys):
    code, out, _ = run(["sweep", "--model", "llama-3.1-8b", "--contexts", "1024,131072",
                        "--sequences", "1,16", "--json"], capsys)
    rows = {(r["context"], r["sequences"]): r for r in json.loads(out)["rows"]}
    assert code == 0 and len(rows) == 4
    assert rows[(131072, 1)]["tokens_per_s_per_user"] < rows[(1024, 1)]["tokens_per_s_per_user"]
    assert rows[(1024, 16)]["pipeline_tokens_per_s"] > 10 * rows[(1024, 1)]["pipeline_tokens_per_s"]
    assert rows[(131072, 16)]["wafers"] > 1  # 2M tokens of KV do not fit one wafer
