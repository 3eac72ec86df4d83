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


def test_run_cached_tokens_cut_only_the_ttft(capsys):
    """A prefix cache's hit: the cached prompt tokens are not streamed again; decode is as before."""
    base = ["run", "--model", "llama-3.1-8b", "--prompt", "2048", "--output", "16", "--json"]
    full = json.loads(run(base, capsys)[1])
    code, out, _ = run(base + ["--cached-tokens", "2000"], capsys)
    hit = json.loads(out)
    assert code == 0 and full["cached_tokens"] == 0 and hit["cached_tokens"] == 2000
    assert hit["ttft_us"] < full["ttft_us"] / 10
    assert hit["mean_itl_us"] == pytest.approx(full["mean_itl_us"])
    from sim.clock import WaferClock
    clock = WaferClock.from_spec("wse3:llama-3.1-8b")
    assert (clock.ttft_us(2048, cached_tokens=2000) < clock.ttft_us(2048, cached_tokens=1000)
            < clock.ttft_us(2048))
    code, out, _ = run(base[:-1] + ["--cached-tokens", "2000"], capsys)
    assert code == 0 and "(2000 cached)" in out
    code, _, err = run(base + ["--cached-tokens", "2048"], capsys)
    assert code == 2 and "--cached-tokens=2048 must be in [0, --prompt - 1 = 2047]" in err


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
    (["run", "--model", "smollm2-135m", "--prompt", "8000", "--output", "500"],
     "--prompt 8000 + --output 500 exceeds smollm2-135m's context of 8192"),
    (["run", "--model", "llama-3.1-8b", "--sequences", "0"], "--sequences=0 must be >= 1"),
    (["plan", "--model", "llama-3.1-8b", "--context", "0"], "--context=0 must be >= 1"),
    (["plan", "--model", "llama-3.1-8b", "--context", "-5"], "--context=-5 must be >= 1"),
    (["plot", "--model", "llama-3.1-8b", "--context", "0"], "--context=0 must be >= 1"),
    (["run", "--model", "llama-3.1-8b", "--context", "0"], "--context=0 must be >= 1"),
    (["plan", "--model", "llama-3.1-8b", "--context", "200000"], "--context=200000 exceeds llama-3.1-8b's context"),
    (["plan", "--model", "llama-3.1-8b", "--wafers", "0"], "--wafers=0 must be >= 1"),
    (["run", "--model", "llama-3.1-8b", "--wafers", "-1"], "--wafers=-1 must be >= 1"),
    (["trace", "--model", "llama-3.2-1b", "--max-in-flight", "0"], "--max-in-flight=0 must be >= 1"),
    (["trace", "--model", "llama-3.2-1b", "--rate", "0"], "--rate=0.0 must be a finite number > 0"),
    (["trace", "--model", "llama-3.2-1b", "--rate", "nan"], "--rate=nan must be a finite number > 0"),
    (["trace", "--model", "llama-3.2-1b", "--rate", "inf"], "--rate=inf must be a finite number > 0"),
    (["trace", "--model", "llama-3.2-1b", "--requests", "0"], "--requests=0 must be >= 1"),
    (["trace", "--model", "llama-3.2-1b", "--prompt", "0"], "--prompt=0 must be >= 1"),
    (["trace", "--model", "llama-3.2-1b", "--seed", "-1"], "--seed=-1 must be >= 0"),
    (["sweep", "--model", "llama-3.2-1b", "--prompt", "0"], "--prompt=0 must be >= 1"),
    (["run", "--model", "llama-3.1-8b", "--context", "500"], "--prompt 512 + --output 256 exceeds --context 500"),
    (["run", "--model", "llama-3.1-8b", "--sequences", "100000"], "; reduce --context or --sequences"),
    (["trace", "--model", "llama-3.1-8b", "--max-in-flight", "100000", "--requests", "100000"],
     "; reduce --context or --max-in-flight"),
    (["plan", "--model", "llama-3.1-8b", "--hw", "tpu"], "unknown hardware 'tpu'"),
    (["plan", "--model", "model.gguf"], "needs the engine's loader"),
])
def test_errors_are_one_line_and_nonzero(argv, needle, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("wafer sim: error: ") and needle in err
    assert "--batch" not in err or "--batch" in argv  # names the flag the user typed


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


def test_plan_pes_per_layer_is_one_type_for_one_and_many_wafers(capsys):
    for model, wafers in (("llama-3.1-8b", 1), ("llama-3.1-70b", 4)):
        d = json.loads(run(["plan", "--model", model, "--json"], capsys)[1])
        assert isinstance(d["pes_per_layer"], list) and len(d["pes_per_layer"]) == wafers
        first_layer = [next(r["pes"] for r in d["regions"] if r["wafer"] == w and r["stage"].startswith("L"))
                       for w in range(wafers)]
        assert d["pes_per_layer"] == first_layer


def test_run_and_trace_reserve_kv_for_the_requests_and_agree(capsys):
    """No --context: KV for prompt + output per sequence, so the same single request plans the
    same wafers in run and trace (trace reserves for no more sequences than it has requests)."""
    r = json.loads(run(["run", "--model", "llama-3.1-70b", "--json"], capsys)[1])
    t = json.loads(run(["trace", "--model", "llama-3.1-70b", "--requests", "1", "--json"], capsys)[1])
    assert r["kv_reserved"] == t["kv_reserved"] == {"tokens_per_sequence": 768, "sequences": 1, "tokens": 768}
    assert r["wafers"] == t["wafers"] == 4
    assert t["ttft_us"]["mean"] == pytest.approx(r["ttft_us"], rel=1e-6)
    assert t["itl_us"]["mean"] == pytest.approx(r["mean_itl_us"], rel=1e-6)
    # run --sequences 32 plans like the sweep row for the same context and sequences
    r32 = json.loads(run(["run", "--model", "llama-3.1-8b", "--sequences", "32", "--json"], capsys)[1])
    sw = json.loads(run(["sweep", "--model", "llama-3.1-8b", "--contexts", "768", "--sequences", "32",
                         "--json"], capsys)[1])
    assert r32["kv_reserved"]["tokens"] == 768 * 32 and r32["wafers"] == sw["rows"][0]["wafers"] == 1
    # an explicit --context is the reservation; trace holds KV for --max-in-flight sequences
    t8 = json.loads(run(["trace", "--model", "llama-3.2-1b", "--requests", "20", "--context", "4096",
                         "--json"], capsys)[1])
    assert t8["kv_reserved"] == {"tokens_per_sequence": 4096, "sequences": 8, "tokens": 4096 * 8}


def test_run_and_trace_print_the_kv_reservation(capsys):
    out = run(["run", "--model", "llama-3.1-8b", "--sequences", "2"], capsys)[1]
    assert "KV reserved for 768 tokens x 2 sequence(s) = 1,536 tokens" in out
    out = run(["trace", "--model", "llama-3.2-1b", "--requests", "3", "--prompt", "100", "--output", "28"], capsys)[1]
    assert "KV reserved for 128 tokens x 3 sequence(s) = 384 tokens" in out


def test_trace_json_times_are_from_the_trace_start_and_ttft_from_arrival(capsys):
    d = json.loads(run(["trace", "--model", "llama-3.2-1b", "--requests", "5", "--rate", "100",
                        "--prompt", "64", "--output", "4", "--json"], capsys)[1])
    for r in d["per_request"]:
        assert r["departures_us"][0] == pytest.approx(r["arrival_us"] + r["ttft_us"])
    with pytest.raises(SystemExit):
        sim_cli.main(["trace", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "departures_us are times from the trace start" in help_text and "ttft_us is the time from arrival" in help_text


def test_calibrate_prints_the_real_step_and_a_readable_clock(capsys):
    code, out, _ = run(["calibrate"], capsys)
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert code == 0 and "1 -> 2" in rows["hop_latency_cycles"] and "(+100%)" in rows["hop_latency_cycles"]
    assert "1.1 GHz -> 1.21 GHz" in rows["clock_hz"] and "( +10%)" in rows["clock_hz"]
    assert "1806.1 tok/s" in out and "445.0 tok/s" in out  # the published-figure matches


@pytest.mark.parametrize("weight_type,bits", [("Q4_1", 5.0), ("Q4_0", 4.5), ("Q8_0", 8.5), ("F16", 16.0),
                                              ("F32", 32.0)])
def test_gguf_uses_the_files_own_bits_per_weight(tiny_gguf, weight_type, bits, capsys):
    import argparse

    from engine.shapes import gguf_model_shape

    path = str(tiny_gguf(weight_type))
    assert gguf_model_shape(path).bytes_per_weight == bits / 8
    parser = argparse.ArgumentParser()
    sim_cli.add_parsers(parser.add_subparsers(dest="command"), load_gguf_shape=gguf_model_shape)

    def plan_of(*extra):
        args = parser.parse_args(["sim", "plan", "--model", path, *extra])
        assert args.func(args) == 0
        return capsys.readouterr().out

    d = json.loads(plan_of("--json"))
    assert d["precision_bits"] == bits
    assert f"({bits:g}-bit," in plan_of()
    assert json.loads(plan_of("--precision", "8", "--json"))["precision_bits"] == 8
