"""benches.compare: each commit's own benches run in alternating rounds, and only a change every
round agrees on is a regression."""

from __future__ import annotations

import subprocess

from benches.compare import compare, verdict


def test_only_a_change_every_round_agrees_on_counts():
    assert verdict([0.80, 0.85, 0.70], "higher", 0.1) == "regression"
    assert verdict([1.25, 1.3, 1.2], "lower", 0.1) == "regression"
    assert verdict([0.80, 1.02, 0.70], "higher", 0.1) == "same"   # one quiet round: noise
    assert verdict([0.95, 0.93, 0.97], "higher", 0.1) == "same"   # within the tolerance
    assert verdict([1.3, 1.2, 1.4], "higher", 0.1) == "improvement"
    assert verdict([], "higher", 0.1) == "same"


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


BENCH = """
def test_x(benchmark):
    benchmark.extra_info["v"] = {v}
    benchmark(lambda: None)
"""


def test_each_side_runs_its_own_commit(tmp_path):
    """The base runs from a worktree of its commit, the candidate from the working tree: a metric
    that differs between them shows in every round, and gates as its direction says."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "bench_x.py").write_text(BENCH.format(v=1))
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "base")
    (repo / "bench_x.py").write_text(BENCH.format(v=2))
    res = compare("HEAD", None, "bench_x.py", "", 2, {"v": "lower"}, 0.1, root=repo)
    row = next(r for r in res["metrics"] if r["metric"] == "test_x / v")
    assert (row["base"], row["candidate"], row["ratio"]) == (1, 2, 2)
    assert row["verdict"] == "regression" and "test_x / v" in res["regressions"]
    res = compare("HEAD", None, "bench_x.py", "", 1, {"v": "higher"}, 0.1, root=repo)
    assert next(r for r in res["metrics"] if r["metric"] == "test_x / v")["verdict"] == "improvement"
    assert subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True,
                          text=True).stdout.count("\n") == 1  # the base's worktree is gone
