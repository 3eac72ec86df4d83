"""The perf gate: exact comparison of deterministic metrics, the every-round rule for ratios, and
the gate catching a planted simulator change against the committed baseline."""

from __future__ import annotations

import dataclasses
import json

import pytest

from benches import gate
from sim import hardware


def test_deterministic_metrics_compare_exactly():
    base = {"a": 3, "b": 1.5, "c": [1, 2], "gone": 1}
    now = {"a": 3, "b": 1.5 * (1 + 1e-12), "c": [1, 3], "fresh": 2}
    status = {r["metric"]: r["status"] for r in gate.compare_deterministic(base, now)}
    assert status == {"a": "same", "b": "same", "c": "changed", "gone": "missing", "fresh": "new"}
    assert [r["metric"] for r in gate.failed(gate.compare_deterministic(base, now))] == ["c", "gone"]


def test_a_ratio_fails_only_when_every_round_is_worse():
    base = {"x": {"value": 1.0, "tolerance": 0.2}}
    worse = gate.compare_ratios(base, [{"x": 0.7}, {"x": 0.75}, {"x": 0.6}], {"x": "higher"})
    assert worse[0]["status"] == "regression"
    one_noisy = gate.compare_ratios(base, [{"x": 0.5}, {"x": 0.95}, {"x": 1.1}], {"x": "higher"})
    assert one_noisy[0]["status"] == "same"
    lower_is_better = gate.compare_ratios(base, [{"x": 1.3}, {"x": 1.4}], {"x": "lower"})
    assert lower_is_better[0]["status"] == "regression"
    assert gate.compare_ratios({}, [{"x": 1.0}], {"x": "higher"})[0]["status"] == "new"


def test_committed_baseline_passes_and_a_changed_simulator_constant_fails(monkeypatch, tmp_path, capsys):
    out = tmp_path / "gate.json"
    assert gate.main(["--no-model", "--only", "deterministic", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["failing"] == 0

    slower = dataclasses.replace(hardware.PRESETS["wse3"], hop_latency_cycles=2)
    monkeypatch.setitem(hardware.PRESETS, "wse3", slower)
    assert gate.main(["--no-model", "--only", "deterministic", "--json", str(out)]) == 1
    failing = [r["metric"] for r in json.loads(out.read_text())["rows"] if r["status"] == "changed"]
    assert failing and all("@wse3" in m for m in failing)
    assert "changed" in capsys.readouterr().out


def test_update_writes_a_baseline_the_next_run_passes(tmp_path):
    path = tmp_path / "baseline.json"
    assert gate.main(["--no-model", "--only", "deterministic", "--baseline", str(path), "--update"]) == 0
    assert json.loads(path.read_text())["deterministic"]
    assert gate.main(["--no-model", "--only", "deterministic", "--baseline", str(path)]) == 0


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--only", "nothing"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        gate.main(argv)
    assert e.value.code == 2
