"""benches/bench_sim.py puts its numbers in the pytest-benchmark JSON, not only on the terminal."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_sim_records_numbers_in_extra_info(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "benches/bench_sim.py", "--benchmark-only",
                    "-p", "no:cacheprovider", f"--benchmark-json={out}", "--benchmark-max-time=0.01",
                    "--benchmark-min-rounds=1", "--benchmark-warmup=off"],
                   cwd=ROOT, check=True, capture_output=True)
    info = {b["name"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert len(info) == 5
    for name, extra in info.items():
        assert {"wafers", "sim_wall_mean_ms"} <= set(extra), name
        assert all(isinstance(v, (int, float)) for v in extra.values()), name
        assert "tok_s" not in extra  # the wafer's simulated tok/s is named as such
    assert info["test_plan_70b"]["wafers"] == 4
    assert 400 < info["test_decode_10k_steps_70b_per_call"]["simulated_wafer_tok_s"] < 500
    assert info["test_decode_10k_steps_70b_schedule"]["simulated_ttft_ms"] > 0
    assert info["test_event_mode_1000_requests"]["simulated_wafer_tok_s"] > 0
