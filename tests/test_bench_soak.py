"""`wafer bench soak` end to end at a tiny size: a local server of the tiny model, a few seconds
of mixed load, then soak.json (windows with RSS/fds/threads/latency, a summary) and soak.png."""

from __future__ import annotations

import json

from benches import bench_soak


def test_soak_writes_windows_summary_and_plot(tiny_gguf, tmp_path, capsys):
    path = tiny_gguf("Q4_1", context_length=512)
    rc = bench_soak.main(["--model", str(path), "--minutes", "0.1", "--window", "2", "--concurrency", "3",
                          "--max-tokens", "8", "--result-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    windows = [w for w in result["windows"] if w.get("ops")]
    assert len(windows) >= 2
    for w in result["windows"]:
        assert w["rss_mb"] > 0 and w["fds"] > 0 and w["threads"] > 0
    s = result["summary"]
    assert s["ops"] == sum(w["ops"] for w in windows) and s["ops"] >= 3
    assert s["server_exit_code"] == 0  # SIGTERM after the soak: a clean drain
    assert set(s["codes"]) <= {"OK", "CANCELLED(client)", "DEADLINE_EXCEEDED", "NOT_FOUND",
                               "RESOURCE_EXHAUSTED", "CANCELLED"}
    assert s["codes"].get("OK", 0) >= 1
    assert "rss_mb_idle_end" in s and "p99_e2e_ms_last" in s
    assert json.loads(capsys.readouterr().out)["ops"] == s["ops"]
