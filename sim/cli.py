"""`wafer sim plan|plot|run|sweep|trace|calibrate`: the wafer simulator from the command line.

Errors print one line to stderr and exit 2. `--json` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from sim.hardware import HardwareSpec, get_hardware
from sim.placement import Plan, PlacementError, plan
from sim.shapes import ModelShape, get_shape

GB = 1e9


class CliError(Exception):
    pass


def add_parsers(subparsers, load_gguf_shape: Callable[[str], ModelShape] | None = None) -> None:
    """Register `sim` and its subcommands. `load_gguf_shape(path)` turns a .gguf path given as
    --model into a ModelShape (the engine supplies it; the sim reads no files itself)."""
    p = subparsers.add_parser("sim", help="wafer simulator: placement, timing, traces")
    sub = p.add_subparsers(dest="sim_command", required=True)

    def common(sp, context=True):
        sp.add_argument("--model", required=True, help="model preset (e.g. llama-3.1-70b) or a .gguf path")
        sp.add_argument("--hw", default="wse3", help="hardware preset (wse3, wse2) or a .toml file with base = ...")
        sp.add_argument("--hw-config", help="TOML file of hardware overrides")
        sp.add_argument("--precision", type=int, choices=(16, 8), default=None,
                        help="weight bits (default 16 for presets, the file's own for .gguf)")
        sp.add_argument("--wafers", type=int, help="force a wafer count (default: the minimum)")
        if context:
            sp.add_argument("--context", type=int, help="context length to reserve KV for "
                            "(default: min(8192, model context))")
        sp.set_defaults(load_gguf_shape=load_gguf_shape)

    sp = sub.add_parser("plan", help="does it fit, on how many wafers, where does each layer go")
    common(sp)
    sp.add_argument("--batch", type=int, default=1, help="concurrent sequences to reserve KV for")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_plan))

    sp = sub.add_parser("plot", help="draw the wafer(s) with each region")
    common(sp)
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("-o", "--output", default="plan.png")
    sp.set_defaults(func=_guard(cmd_plot))

    sp = sub.add_parser("run", help="per-token latency, tok/s, pipeline throughput, TTFT")
    common(sp)
    sp.add_argument("--prompt", type=int, default=512)
    sp.add_argument("--output", type=int, default=256)
    sp.add_argument("--sequences", type=int, default=1, help="sequences in flight")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_run))

    sp = sub.add_parser("sweep", help="tok/s per user, pipeline tok/s and TTFT across contexts and sequence counts")
    common(sp, context=False)
    sp.add_argument("--contexts", default="1024,8192,32768,131072", help="comma-separated context lengths")
    sp.add_argument("--sequences", default="1,4,16,64", help="comma-separated sequence counts")
    sp.add_argument("--prompt", type=int, default=512, help="prompt length for the TTFT column")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_sweep))

    sp = sub.add_parser("trace", help="discrete-event run over a request trace")
    common(sp)
    sp.add_argument("--trace", help="CSV (arrival_us,prompt,output) or JSON trace; default synthetic Poisson")
    sp.add_argument("--requests", type=int, default=100)
    sp.add_argument("--rate", type=float, default=10.0, help="Poisson arrivals per second")
    sp.add_argument("--prompt", type=int, default=512)
    sp.add_argument("--output", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-in-flight", type=int, default=8, help="sequences holding KV at once")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_trace))

    sp = sub.add_parser("calibrate", help="predictions at the public calibration points and sensitivities")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_calibrate))


def _guard(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (CliError, PlacementError, ValueError, KeyError, OSError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"wafer sim: error: {msg}", file=sys.stderr)
            return 2
    return run


# --- inputs ----------------------------------------------------------------------------------

def _shape(args) -> ModelShape:
    if args.model.endswith(".gguf"):
        loader = getattr(args, "load_gguf_shape", None)
        if loader is None:
            raise CliError(f"--model {args.model}: reading GGUF headers needs the engine's loader; "
                           f"use a preset or run through the `wafer` CLI")
        shape = loader(args.model)
        return shape.with_precision(args.precision) if args.precision else shape
    return get_shape(args.model, args.precision or 16)


def _hw(args) -> HardwareSpec:
    return get_hardware(args.hw, args.hw_config)


def _plan(args, batch: int) -> Plan:
    shape = _shape(args)
    context = args.context or min(8192, shape.context_length)
    for name, v in (("--context", context), ("--batch/--sequences", batch)):
        if v < 1:
            raise CliError(f"{name}={v} must be >= 1")
    return plan(shape, _hw(args), context, batch, args.wafers)


# --- commands --------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    p = _plan(args, args.batch)
    d = p.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['model']} ({d['precision_bits']}-bit, {d['weights_gb']:.1f} GB weights) on {d['hardware']}: "
          f"{d['wafers']} wafer(s), KV reserved for {p.context} tokens x {p.batch} sequence(s)")
    print(f"KV capacity: {d['kv_capacity_tokens']:,} tokens ({d['max_sequences_at_context']:,} sequences "
          f"of {p.context}); fullest PE {d['max_sram_bytes_per_pe']:,} of {p.hw.sram_bytes_per_pe:,} bytes")
    print(f"PEs per layer: {d['pes_per_layer']}")
    print(f"{'wafer':>5} {'stages':<16} {'region':>9} {'PEs used':>16} {'weights GB':>10} {'KV GB':>7} "
          f"{'buffers GB':>10} {'code GB':>8} {'KV cap tok':>11}")
    for w, wp in zip(d["per_wafer"], p.wafers):
        st = w["stages"]
        span = st[0] if len(st) == 1 else f"{st[0]}..{st[-1]}"
        layer = next((r for r in wp.regions if r.stage.kind == "layer"), wp.regions[0])
        cap = "-" if w["kv_capacity_tokens"] is None else f"{w['kv_capacity_tokens']:,}"
        print(f"{w['wafer']:>5} {span:<16} {layer.rows:>4}x{layer.cols:<4} "
              f"{w['pes_used']:>8,}/{w['pes_total']:<7,} {w['weights_gb']:>10.2f} {w['kv_gb']:>7.2f} "
              f"{w['buffers_gb']:>10.2f} {w['reserved_gb']:>8.2f} {cap:>11}")
    return 0


def cmd_plot(args) -> int:
    from sim.plot import draw_plan

    p = _plan(args, args.batch)
    draw_plan(p, args.output)
    print(f"wrote {args.output} ({p.n_wafers} wafer(s), {len(p.regions)} regions)")
    return 0


def cmd_run(args) -> int:
    from sim.timing import TimingModel, summarize

    for name in ("prompt", "output", "sequences"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name}={getattr(args, name)} must be >= 1")
    shape = _shape(args)
    if args.context is None:
        args.context = min(max(8192, args.prompt + args.output), shape.context_length)
    if args.prompt + args.output > args.context:
        raise CliError(f"--prompt {args.prompt} + --output {args.output} exceeds the context of {args.context}")
    p = _plan(args, args.sequences)
    s = summarize(TimingModel(p), args.prompt, args.output, args.sequences)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    hw = p.hw
    print(f"{s['model']} on {s['wafers']} x {s['hardware']}, prompt {s['prompt']}, output {s['output']}, "
          f"{s['sequences']} sequence(s) in flight")
    print(f"per-token latency {s['token_latency_us']:.1f} us ({s['token_latency_cycles']:,} cycles) "
          f"at context {s['breakdown_context']}:")
    total = s["token_latency_cycles"]
    for k, v in s["breakdown_cycles"].items():
        print(f"  {k:<15} {v:>11,} cycles {hw.cycles_to_us(v):>9.1f} us {100 * v / total:5.1f}%")
    print(f"tokens/s per user   {s['tokens_per_s_per_user']:,.0f}  (mean gap {s['mean_itl_us']:.1f} us)")
    slowest = max(s["regions"], key=lambda r: r["cycles"])
    print(f"pipeline tokens/s   {s['pipeline_tokens_per_s']:,.0f}  (ceiling {s['max_pipeline_tokens_per_s']:,.0f} "
          f"when the slowest region, {slowest['stage']} at {s['slowest_region_us']:.1f} us, never idles)")
    print(f"TTFT                {s['ttft_us'] / 1000:.2f} ms for {s['prompt']} prompt tokens")
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{flag}={text!r} must be comma-separated integers") from None
    if not vals or min(vals) < 1:
        raise CliError(f"{flag}={text!r} must list integers >= 1")
    return vals


def cmd_sweep(args) -> int:
    """Each row re-plans for its (context, sequences): KV room changes region sizes and wafer
    count. Decode is measured at the full context (the slowest point of a sequence's life)."""
    from sim.timing import TimingModel

    shape, hw = _shape(args), _hw(args)
    rows = []
    for ctx in _ints(args.contexts, "--contexts"):
        for seqs in _ints(args.sequences, "--sequences"):
            row = {"context": ctx, "sequences": seqs}
            try:
                p = plan(shape, hw, ctx, seqs, args.wafers)
            except PlacementError as e:
                row["error"] = str(e)
                rows.append(row)
                continue
            tm = TimingModel(p)
            itl = tm.itl_cycles(ctx, seqs)
            row.update(wafers=p.n_wafers, tokens_per_s_per_user=hw.clock_hz / itl,
                       pipeline_tokens_per_s=seqs * hw.clock_hz / itl,
                       ttft_us=hw.cycles_to_us(tm.ttft_cycles(min(args.prompt, ctx), 0, seqs)))
            rows.append(row)
    if args.json:
        print(json.dumps({"model": shape.name, "hardware": hw.name, "prompt": args.prompt, "rows": rows}, indent=2))
        return 0
    print(f"{shape.name} on {hw.name}: decode at full context, TTFT for a {args.prompt}-token prompt")
    print(f"{'context':>8} {'seqs':>5} {'wafers':>6} {'tok/s/user':>11} {'pipeline tok/s':>15} {'TTFT ms':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>8} {r['sequences']:>5}   does not fit: {r['error'].split(';')[0]}")
            continue
        print(f"{r['context']:>8} {r['sequences']:>5} {r['wafers']:>6} {r['tokens_per_s_per_user']:>11,.0f} "
              f"{r['pipeline_tokens_per_s']:>15,.0f} {r['ttft_us'] / 1000:>9.2f}")
    return 0


def cmd_trace(args) -> int:
    from sim import events
    from sim.timing import TimingModel

    if args.trace:
        reqs = events.load_trace(args.trace)
    else:
        reqs = events.poisson_trace(args.requests, args.rate, args.prompt, args.output, args.seed)
    if not reqs:
        raise CliError("the trace has no requests")
    shape = _shape(args)
    longest = max(r.prompt + r.output for r in reqs)
    if args.context is None:
        args.context = min(max(8192, longest), shape.context_length)
    if longest > args.context:
        raise CliError(f"a request needs {longest} tokens of context; --context is {args.context}")
    p = _plan(args, args.max_in_flight)
    res = events.simulate(TimingModel(p), reqs, max_in_flight=args.max_in_flight)
    s = events.summarize(res)
    s.update(model=p.shape.name, hardware=p.hw.name, wafers=p.n_wafers, max_in_flight=args.max_in_flight)
    if args.json:
        s["per_request"] = [{"arrival_us": r.request.arrival_us, "ttft_us": r.ttft_us,
                             "departures_us": r.departures_us} for r in res]
        print(json.dumps(s))
        return 0
    print(f"{s['model']} on {s['wafers']} x {s['hardware']}: {s['requests']} requests, {s['tokens']:,} tokens "
          f"over {s['span_s']:.2f} s simulated ({s['throughput_tokens_per_s']:,.0f} tok/s), "
          f"max {args.max_in_flight} in flight")
    for k in ("ttft_us", "itl_us"):
        v = s[k]
        print(f"  {k[:-3].upper():<5} mean {v['mean'] / 1000:8.3f} ms  p50 {v['p50'] / 1000:8.3f} ms  "
              f"p99 {v['p99'] / 1000:8.3f} ms")
    return 0


def cmd_calibrate(args) -> int:
    from sim import calibrate

    preds = [calibrate.predict(pt) for pt in calibrate.POINTS]
    sens = calibrate.sensitivity()
    if args.json:
        print(json.dumps({"points": preds, "sensitivity": sens}, indent=2))
        return 0
    for pt, s in zip(calibrate.POINTS, preds):
        print(f"{pt.model:<14} {s['wafers']} x {pt.hardware} (public: {pt.wafers}): "
              f"{s['tokens_per_s_per_user']:7.1f} tok/s vs {pt.tokens_per_s:.0f} public ({100 * s['error']:+.1f}%)")
    print("raising each assumed constant ~10% changes tok/s by:")
    for row in sens:
        cells = "  ".join(f"{pt.model} {100 * row[pt.model]:+5.1f}%" for pt in calibrate.POINTS)
        print(f"  {row['constant']:<22} {row['from']} -> {row['to']}: {cells}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run without the engine: `python -m sim.cli plan --model ...`."""
    parser = argparse.ArgumentParser(prog="wafer")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sim", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
