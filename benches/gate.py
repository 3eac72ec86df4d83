"""`wafer bench gate`: a perf-regression gate that fails on a real regression, not on noise.

    wafer bench gate                       # deterministic part + wall-clock ratios, against benches/baseline.json
    wafer bench gate --only deterministic  # what CI runs on every submission (about a minute)
    wafer bench gate --update              # accept the current numbers as the new baseline
    wafer bench gate --json gate.json      # the comparison, for machines

Deterministic metrics (see benches/gate_metrics.py) are compared exactly; floats to a relative
1e-9, so only a real change in the simulator, the kernels' numbers, the sampler or the scheduler's
policy fails them. Wall-clock metrics are ratios to references timed in the same round, over
interleaved rounds; one fails only when every round is worse than the baseline's ratio by more
than its tolerance (the rule of `python -m benches.compare`): a busy round cannot fail the gate
alone, a real slowdown moves every round.

Exit codes: 0 no regression, 1 a regression (or a deterministic change), 2 a usage error or a
baseline without the metric.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from benches.compare import verdict

BASELINE = Path(__file__).with_name("baseline.json")
FLOAT_RTOL = 1e-9
DEFAULT_TOLERANCE = 0.25  # wall-clock ratios: a round must be 25% worse than the baseline to count


def compare_deterministic(base: dict, now: dict) -> list[dict]:
    """One row per metric: 'same', 'changed', 'new' (not in the baseline) or 'missing'."""
    rows = []
    for name in sorted(set(base) | set(now)):
        b, n = base.get(name), now.get(name)
        if name not in now:
            status = "missing"
        elif name not in base:
            status = "new"
        elif isinstance(b, float) or isinstance(n, float):
            status = "same" if math.isclose(b, n, rel_tol=FLOAT_RTOL, abs_tol=0.0) else "changed"
        else:
            status = "same" if b == n else "changed"
        rows.append({"metric": name, "kind": "deterministic", "baseline": b, "now": n, "status": status})
    return rows


def compare_ratios(base: dict, rounds: list[dict], directions: dict[str, str]) -> list[dict]:
    """One row per wall-clock ratio: each round's value over the baseline's, and the verdict."""
    rows = []
    for name, direction in directions.items():
        values = [r[name] for r in rounds]
        ref = base.get(name)
        if ref is None:
            rows.append({"metric": name, "kind": "ratio", "baseline": None, "now": statistics.median(values),
                         "rounds": values, "status": "new"})
            continue
        tolerance = ref.get("tolerance", DEFAULT_TOLERANCE)
        rel = [v / ref["value"] for v in values]
        v = verdict(rel, direction, tolerance)
        rows.append({"metric": name, "kind": "ratio", "baseline": ref["value"], "now": statistics.median(values),
                     "rounds": values, "vs_baseline": [round(x, 3) for x in rel], "tolerance": tolerance,
                     "status": {"regression": "regression", "improvement": "improved"}.get(v, "same")})
    return rows


def failed(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] in ("changed", "missing", "regression")]


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 48 else text[:45] + "..."


def print_table(rows: list[dict], out=None) -> None:
    out = out or sys.stdout
    width = max((len(r["metric"]) for r in rows), default=10)
    for r in rows:
        if r["status"] == "same" and r["kind"] == "deterministic":
            continue
        extra = f"  rounds/baseline {r['vs_baseline']} (tolerance {r['tolerance']})" if "vs_baseline" in r else ""
        print(f"{r['status']:<10} {r['metric']:<{width}}  baseline {_short(r['baseline'])}  now {_short(r['now'])}{extra}",
              file=out)
    same = sum(r["status"] == "same" for r in rows)
    print(f"{len(rows)} metrics: {same} same, {len(failed(rows))} failing, "
          f"{sum(r['status'] in ('new', 'improved') for r in rows)} new or improved", file=out)


def run(args) -> int:
    from benches import gate_metrics as gm

    path = Path(args.baseline)
    baseline = json.loads(path.read_text()) if path.exists() else {"deterministic": {}, "ratios": {}}
    model_path = None
    if not args.no_model:
        from engine.fetch import resolve_model

        model_path = str(resolve_model(args.model))
    rows: list[dict] = []
    det = rounds = None
    if args.only in (None, "deterministic"):
        det = gm.deterministic(model_path)
        rows += compare_deterministic(baseline.get("deterministic", {}), det)
        if args.no_model:  # compare only what was measured
            rows = [r for r in rows if r["status"] != "missing" or r["metric"].startswith("sim/")]
    if args.only in (None, "wallclock"):
        if model_path is None:
            print("wafer bench gate: the wall-clock part needs the model (drop --no-model)", file=sys.stderr)
            return 2
        wc = gm.WallClock(model_path)
        try:
            rounds = []
            for i in range(args.rounds):
                rounds.append(wc.round())
                print(f"round {i + 1}/{args.rounds}: " + "  ".join(f"{k}={v:.3f}" for k, v in rounds[-1].items()),
                      file=sys.stderr)
        finally:
            wc.close()
        rows += compare_ratios(baseline.get("ratios", {}), rounds, gm.RATIO_DIRECTIONS)
    if args.update:
        if det is not None:
            baseline["deterministic"] = det
        if rounds is not None:
            old = baseline.get("ratios", {})
            baseline["ratios"] = {k: {"value": statistics.median(r[k] for r in rounds), "direction": d,
                                      "tolerance": old.get(k, {}).get("tolerance", args.tolerance)}
                                  for k, d in gm.RATIO_DIRECTIONS.items()}
        path.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path}")
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "failing": len(failed(rows))}, indent=1))
    print_table(rows)
    return 1 if failed(rows) else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", choices=("deterministic", "wallclock"), help="run one part (default: both)")
    p.add_argument("--baseline", default=str(BASELINE), help="baseline file (default benches/baseline.json)")
    p.add_argument("--model", default="smollm2-135m", help="model name or .gguf path (default smollm2-135m)")
    p.add_argument("--no-model", action="store_true", help="simulator metrics only (no model file needed)")
    p.add_argument("--rounds", type=int, default=5, help="wall-clock rounds (default 5)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"wall-clock tolerance written by --update for new metrics (default {DEFAULT_TOLERANCE})")
    p.add_argument("--update", action="store_true", help="write the current numbers as the baseline")
    p.add_argument("--json", help="write the comparison as JSON to this file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wafer bench gate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
