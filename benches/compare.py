"""Compare two commits on the same benches, in alternating rounds on this machine.

Machines here are shared and noisy: a number from another run, or from another hour, says little.
This runs the benches of a base commit and of a candidate (another commit, or the working tree)
one after the other, round after round (the order flips every round), and compares each metric
as the per-round ratio candidate / base. It fails (exit 1) only on a regression every round
agrees on: the median ratio and each round's ratio worse than the tolerance. Noise that makes one
round look bad does not fail it; a real slowdown does.

    python -m benches.compare main                      # the working tree against main
    python -m benches.compare v1 v2 --bench benches/bench_engine.py -k "decode_one or prefill" \\
        --metric "tok/s:higher" --rounds 5 --tolerance 0.05 --json out.json

Gated: each bench's own time (pytest-benchmark's median, lower is better) and every ``--metric
NAME:higher|lower`` (a key of the bench's extra_info). The other numeric extra_info values are
shown, not gated. Each commit runs from its own git worktree with this virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME = "time_median_s"  # pytest-benchmark's median for the bench: always gated, lower is better


def verdict(ratios: list[float], direction: str, tolerance: float) -> str:
    """'regression', 'improvement' or 'same' for per-round ratios candidate / base of a metric
    whose better direction is 'higher' or 'lower': only what every round agrees on counts."""
    worse = [r < 1 - tolerance if direction == "higher" else r > 1 + tolerance for r in ratios]
    better = [r > 1 + tolerance if direction == "higher" else r < 1 - tolerance for r in ratios]
    if ratios and all(worse):
        return "regression"
    if ratios and all(better):
        return "improvement"
    return "same"


def _metrics(report: dict) -> dict[str, float]:
    """bench name / metric -> value, from a pytest-benchmark JSON report."""
    out = {}
    for b in report["benchmarks"]:
        out[f"{b['name']} / {TIME}"] = b["stats"]["median"]
        for k, v in b.get("extra_info", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{b['name']} / {k}"] = float(v)
    return out


def _worktree(root: Path, rev: str, into: Path) -> Path:
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=root,
                         capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"compare: {rev!r} is not a commit here")
    path = into / sha.stdout.strip()[:12]
    subprocess.run(["git", "worktree", "add", "--detach", str(path), sha.stdout.strip()], cwd=root,
                   check=True, capture_output=True)
    return path


def _run(tree: Path, bench: str, expr: str, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "pytest", "-q", bench, "--benchmark-only", "-p", "no:cacheprovider",
           "--benchmark-json", str(out)] + (["-k", expr] if expr else [])
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"compare: the bench failed in {tree}:\n{tail}")
    return _metrics(json.loads(out.read_text()))


def compare(base: str, candidate: str | None, bench: str, expr: str, rounds: int,
            gated: dict[str, str], tolerance: float, root: Path = ROOT) -> dict:
    with tempfile.TemporaryDirectory(prefix="wafer-compare-") as tmp:
        tmp = Path(tmp)
        trees = {"base": _worktree(root, base, tmp),
                 "candidate": root if candidate is None else _worktree(root, candidate, tmp)}
        try:
            runs: dict[str, list[dict[str, float]]] = {"base": [], "candidate": []}
            for r in range(rounds):
                order = ("base", "candidate") if r % 2 == 0 else ("candidate", "base")
                for side in order:
                    print(f"compare: round {r + 1}/{rounds}: {side}", file=sys.stderr, flush=True)
                    runs[side].append(_run(trees[side], bench, expr, tmp / f"{side}-{r}.json"))
        finally:
            for tree in trees.values():
                if tree != root:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root,
                                   capture_output=True)
    rows = []
    for key in sorted(set(runs["base"][0]) & set(runs["candidate"][0])):
        b = [run[key] for run in runs["base"] if key in run]
        c = [run[key] for run in runs["candidate"] if key in run]
        ratios = [cv / bv for bv, cv in zip(b, c) if bv]
        metric = key.rsplit(" / ", 1)[1]
        direction = "lower" if metric == TIME else gated.get(metric)
        rows.append({
            "metric": key, "base": statistics.median(b), "candidate": statistics.median(c),
            "ratio": statistics.median(ratios) if ratios else float("nan"),
            "ratio_min": min(ratios, default=float("nan")), "ratio_max": max(ratios, default=float("nan")),
            "gated": direction or "",
            "verdict": verdict(ratios, direction, tolerance) if direction else "",
        })
    return {"base": base, "candidate": candidate or "working tree", "bench": bench, "k": expr,
            "rounds": rounds, "tolerance": tolerance, "metrics": rows,
            "regressions": [r["metric"] for r in rows if r["verdict"] == "regression"]}


def _metric_arg(text: str) -> tuple[str, str]:
    name, _, direction = text.rpartition(":")
    if direction not in ("higher", "lower") or not name:
        raise argparse.ArgumentTypeError(f"--metric {text!r}: expected NAME:higher or NAME:lower")
    return name, direction


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benches.compare", description=__doc__.split("\n")[0])
    ap.add_argument("base", help="the commit to compare against (a branch, tag or sha)")
    ap.add_argument("candidate", nargs="?", help="the commit to judge (default: the working tree)")
    ap.add_argument("--bench", default="benches/bench_engine.py", help="bench file (default %(default)s)")
    ap.add_argument("-k", default="decode_one or prefill_512 or batched",
                    help="pytest -k expression: which benches (default %(default)r)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--tolerance", type=float, default=0.1,
                    help="ratio change every round must exceed to count (default 0.1 = 10%%)")
    ap.add_argument("--metric", type=_metric_arg, action="append", default=[],
                    metavar="NAME:higher|lower", help="also gate this extra_info key (repeatable)")
    ap.add_argument("--json", type=Path, help="write the comparison here")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds={args.rounds} must be at least 1")
    if not 0 < args.tolerance < 1:
        ap.error(f"--tolerance={args.tolerance} must be in (0, 1)")
    res = compare(args.base, args.candidate, args.bench, args.k, args.rounds, dict(args.metric),
                  args.tolerance)
    print(f"{res['candidate']} against {res['base']}: {args.bench} -k {args.k!r}, {args.rounds} "
          f"alternating rounds; ratio = candidate / base (median, and the rounds' range)")
    for r in res["metrics"]:
        mark = {"regression": "  REGRESSION", "improvement": "  better"}.get(r["verdict"], "")
        gate = f" [{r['gated']} is better]" if r["gated"] else ""
        print(f"  {r['metric']:<60} {r['base']:>12.5g} -> {r['candidate']:<12.5g} "
              f"x{r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}){gate}{mark}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if res["regressions"]:
        print(f"compare: {len(res['regressions'])} regression(s) beyond {args.tolerance:.0%} in every "
              f"round: {', '.join(res['regressions'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
