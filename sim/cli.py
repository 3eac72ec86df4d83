"""`wafer sim plan|plot|run|sweep|trace|calibrate`: the wafer simulator from the command line.

Errors print one line to stderr and exit 2. `--json` prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
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

    def common(sp, context_default="min(8192, model context)"):
        sp.add_argument("--model", required=True, help="model preset (e.g. llama-3.1-70b) or a .gguf path")
        sp.add_argument("--hw", default="wse3", help="hardware preset (wse3, wse2) or a .toml file with base = ...")
        sp.add_argument("--hw-config", help="TOML file of hardware overrides")
        sp.add_argument("--precision", type=int, choices=(16, 8), default=None,
                        help="weight bits (default 16 for presets, the file's own for .gguf: "
                             "5 for Q4_1, 4.5 for Q4_0, 8.5 for Q8_0)")
        sp.add_argument("--wafers", type=int, help="force a wafer count (default: the minimum)")
        if context_default:
            sp.add_argument("--context", type=int, help="tokens of KV to reserve per sequence "
                            f"(default: {context_default})")
        sp.set_defaults(load_gguf_shape=load_gguf_shape)

    sp = sub.add_parser("plan", help="does it fit, on how many wafers, where does each layer go")
    common(sp)
    sp.add_argument("--batch", type=int, default=1, help="concurrent sequences to reserve KV for")
    sp.add_argument("--json", action="store_true",
                    help="print JSON; pes_per_layer lists the PEs of a layer region per wafer (null: no layer)")
    sp.set_defaults(func=_guard(cmd_plan))

    sp = sub.add_parser("plot", help="draw the wafer(s) with each region")
    common(sp)
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("-o", "--output", default="plan.png")
    sp.set_defaults(func=_guard(cmd_plot))

    sp = sub.add_parser("run", help="per-token latency, tok/s, pipeline throughput, TTFT")
    common(sp, "prompt + output")
    sp.add_argument("--prompt", type=int, default=512)
    sp.add_argument("--output", type=int, default=256)
    sp.add_argument("--sequences", type=int, default=1, help="sequences in flight (KV reserved for each)")
    sp.add_argument("--cached-tokens", type=int, default=0, metavar="N",
                    help="prompt tokens whose KV is already on the wafer (a prefix cache's hit): "
                         "TTFT streams only the rest (default 0; at most --prompt - 1)")
    sp.add_argument("--speculate", type=int, default=0, metavar="K",
                    help="speculative decoding: K draft tokens verified per pass (default 0 = off)")
    sp.add_argument("--acceptance", type=float, default=None, metavar="A",
                    help="with --speculate: probability that a draft is accepted given the ones "
                         "before it were, in [0, 1] (default 0.7)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_run))

    sp = sub.add_parser("sweep", help="tok/s per user, pipeline tok/s and TTFT across contexts and sequence counts")
    common(sp, context_default=None)
    sp.add_argument("--contexts", default="1024,8192,32768,131072", help="comma-separated context lengths")
    sp.add_argument("--sequences", default="1,4,16,64", help="comma-separated sequence counts")
    sp.add_argument("--prompt", type=int, default=512, help="prompt length for the TTFT column")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_sweep))

    sp = sub.add_parser("trace", help="discrete-event run over a request trace")
    common(sp, "the longest request's prompt + output")
    sp.add_argument("--trace", help="CSV (arrival_us,prompt,output) or JSON trace; default synthetic Poisson")
    sp.add_argument("--requests", type=int, default=100)
    sp.add_argument("--rate", type=float, default=10.0, help="Poisson arrivals per second")
    sp.add_argument("--prompt", type=int, default=512)
    sp.add_argument("--output", type=int, default=256)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-in-flight", type=int, default=8,
                    help="sequences holding KV at once (KV is reserved for this many, or for every "
                         "request if there are fewer)")
    sp.add_argument("--json", action="store_true",
                    help="print JSON; per request, arrival_us and departures_us are times from the "
                         "trace start and ttft_us is the time from arrival to the first token")
    sp.set_defaults(func=_guard(cmd_trace))

    sp = sub.add_parser("calibrate", help="predictions at the public calibration points and sensitivities")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_guard(cmd_calibrate))


def _guard(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except BrokenPipeError:  # the reader of our output left: wafer's main says nothing
            raise
        except (CliError, PlacementError, ValueError, KeyError, OSError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"wafer sim: error: {msg}", file=sys.stderr)
            return 2
    return run


# --- inputs ----------------------------------------------------------------------------------

def _check(args, *names: str) -> None:
    """--wafers, --context (where the command has them) and `names` must be >= 1 when given."""
    for name in ("wafers", "context", *names):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise CliError(f"--{name.replace('_', '-')}={v} must be >= 1")


def _shape(args) -> ModelShape:
    if args.model.endswith(".gguf"):
        loader = getattr(args, "load_gguf_shape", None)
        if loader is None:
            raise CliError(f"--model {args.model}: reading GGUF headers needs the engine's loader; "
                           f"use a preset or run through the `wafer` CLI")
        shape = loader(args.model)
        return shape if args.precision is None else shape.with_precision(args.precision)
    return get_shape(args.model, 16 if args.precision is None else args.precision)


def _hw(args) -> HardwareSpec:
    return get_hardware(args.hw, args.hw_config)


def _context(args, shape: ModelShape, need: int, what: str) -> int:
    """--context, or by default `need` tokens (capped at the model's context); `what` (the
    flags that make up `need`) must fit in it."""
    context = min(need, shape.context_length) if args.context is None else args.context
    if need > context:
        limit = (f"--context {context}" if args.context is not None
                 else f"{shape.name}'s context of {shape.context_length}")
        raise CliError(f"{what} exceeds {limit}")
    return context


def _plan(args, shape: ModelShape, context: int, batch: int, batch_flag: str) -> Plan:
    """Place `shape` with KV for `batch` sequences of `context` tokens; errors name the flags."""
    if context > shape.context_length:
        raise CliError(f"--context={context} exceeds {shape.name}'s context of {shape.context_length}")
    try:
        return plan(shape, _hw(args), context, batch, args.wafers)
    except PlacementError as e:
        if e.kv_bound:
            raise CliError(f"{e}; reduce --context or {batch_flag}") from None
        raise


def _kv_reserved(p: Plan) -> dict:
    return {"tokens_per_sequence": p.context, "sequences": p.batch, "tokens": p.kv_tokens}


def _plan_args(args) -> Plan:
    """plan and plot: --context (default min(8192, model context)) x --batch."""
    _check(args, "batch")
    shape = _shape(args)
    context = min(8192, shape.context_length) if args.context is None else args.context
    return _plan(args, shape, context, args.batch, "--batch")


# --- commands --------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    p = _plan_args(args)
    d = p.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['model']} ({d['precision_bits']:g}-bit, {d['weights_gb']:.1f} GB weights) on {d['hardware']}: "
          f"{d['wafers']} wafer(s), KV reserved for {p.context} tokens x {p.batch} sequence(s)")
    print(f"KV capacity: {d['kv_capacity_tokens']:,} tokens ({d['max_sequences_at_context']:,} sequences "
          f"of {p.context}); fullest PE {d['max_sram_bytes_per_pe']:,} of {p.hw.sram_bytes_per_pe:,} bytes")
    per_wafer = " / ".join("-" if n is None else f"{n:,}" for n in d["pes_per_layer"])
    print(f"PEs per layer (per wafer): {per_wafer}")
    print(f"{'wafer':>5} {'stages':<16} {'region':>9} {'PEs used':>16} {'weights GB':>10} {'KV GB':>7} "
          f"{'buffers GB':>10} {'reserved GB':>11} {'KV cap tok':>11}")
    for w, wp in zip(d["per_wafer"], p.wafers):
        st = w["stages"]
        span = st[0] if len(st) == 1 else f"{st[0]}..{st[-1]}"
        layer = next((r for r in wp.regions if r.stage.kind == "layer"), wp.regions[0])
        cap = "-" if w["kv_capacity_tokens"] is None else f"{w['kv_capacity_tokens']:,}"
        print(f"{w['wafer']:>5} {span:<16} {layer.rows:>4}x{layer.cols:<4} "
              f"{w['pes_used']:>8,}/{w['pes_total']:<7,} {w['weights_gb']:>10.2f} {w['kv_gb']:>7.2f} "
              f"{w['buffers_gb']:>10.2f} {w['reserved_gb']:>11.2f} {cap:>11}")
    return 0


def cmd_plot(args) -> int:
    from sim.plot import draw_plan

    p = _plan_args(args)
    draw_plan(p, args.output)
    print(f"wrote {args.output} ({p.n_wafers} wafer(s), {len(p.regions)} regions)")
    return 0


def cmd_run(args) -> int:
    from sim.timing import TimingModel, summarize, summarize_speculation

    _check(args, "prompt", "output", "sequences")
    if not 0 <= args.cached_tokens < args.prompt:
        raise CliError(f"--cached-tokens={args.cached_tokens} must be in [0, --prompt - 1 = {args.prompt - 1}] "
                       f"(the last prompt token is always computed)")
    shape = _shape(args)
    context = _context(args, shape, args.prompt + args.output, f"--prompt {args.prompt} + --output {args.output}")
    p = _plan(args, shape, context, args.sequences, "--sequences")
    if not 0 <= args.speculate <= 64:
        raise CliError(f"--speculate {args.speculate} must be in [0, 64] (0 = off)")
    if args.acceptance is not None and not args.speculate:
        raise CliError("--acceptance needs --speculate K")
    acceptance = 0.7 if args.acceptance is None else args.acceptance
    if not 0.0 <= acceptance <= 1.0:
        raise CliError(f"--acceptance {acceptance} must be in [0, 1]")
    tm = TimingModel(p)
    s = summarize(tm, args.prompt, args.output, args.sequences, args.cached_tokens)
    s["kv_reserved"] = _kv_reserved(p)
    if args.speculate:
        s["speculation"] = summarize_speculation(tm, args.prompt, args.output, args.sequences,
                                                 args.speculate, acceptance)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    hw = p.hw
    print(f"{s['model']} on {s['wafers']} x {s['hardware']}, prompt {s['prompt']}, output {s['output']}, "
          f"{s['sequences']} sequence(s) in flight")
    print(f"KV reserved for {p.context:,} tokens x {p.batch} sequence(s) = {p.kv_tokens:,} tokens")
    print(f"per-token latency {s['token_latency_us']:.1f} us ({s['token_latency_cycles']:,} cycles) "
          f"at context {s['breakdown_context']}:")
    total = s["token_latency_cycles"]
    for k, v in s["breakdown_cycles"].items():
        print(f"  {k:<15} {v:>11,} cycles {hw.cycles_to_us(v):>9.1f} us {100 * v / total:5.1f}%")
    print(f"tokens/s per user   {s['tokens_per_s_per_user']:,.0f}  (mean gap {s['mean_itl_us']:.1f} us)")
    slowest = max(s["regions"], key=lambda r: r["cycles"])
    print(f"pipeline tokens/s   {s['pipeline_tokens_per_s']:,.0f}  (ceiling {s['max_pipeline_tokens_per_s']:,.0f} "
          f"when the slowest region, {slowest['stage']} at {s['slowest_region_us']:.1f} us, never idles)")
    cached = f" ({s['cached_tokens']} cached)" if s["cached_tokens"] else ""
    print(f"TTFT                {s['ttft_us'] / 1000:.2f} ms for {s['prompt']} prompt tokens{cached}")
    if args.speculate:
        q = s["speculation"]
        print(f"speculation         {q['drafts']} drafts per pass at acceptance {q['acceptance']:.2f}: "
              f"{q['tokens_per_pass']:.2f} tokens per pass, verify {q['verify_us']:.1f} us")
        print(f"  tokens/s per user {q['tokens_per_s_per_user']:,.0f}  (mean gap {q['mean_itl_us']:.1f} us, "
              f"{q['speedup']:.2f}x plain decoding); pipeline tokens/s {q['pipeline_tokens_per_s']:,.0f}")
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

    _check(args, "prompt")
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

    _check(args, "max_in_flight")
    if args.trace:
        reqs = events.load_trace(args.trace)
    else:
        _check(args, "requests", "prompt", "output")
        if not 0 < args.rate < math.inf:
            raise CliError(f"--rate={args.rate} must be a finite number > 0")
        if args.seed < 0:
            raise CliError(f"--seed={args.seed} must be >= 0")
        reqs = events.poisson_trace(args.requests, args.rate, args.prompt, args.output, args.seed)
    if not reqs:
        raise CliError(f"the trace {args.trace} has no requests")
    shape = _shape(args)
    longest = max(r.prompt + r.output for r in reqs)
    context = _context(args, shape, longest, f"a request of {longest} tokens (prompt + output)")
    # KV for as many sequences as can be in flight at once: never more than there are requests.
    p = _plan(args, shape, context, min(args.max_in_flight, len(reqs)), "--max-in-flight")
    res = events.simulate(TimingModel(p), reqs, max_in_flight=args.max_in_flight)
    s = events.summarize(res)
    s.update(model=p.shape.name, hardware=p.hw.name, wafers=p.n_wafers, max_in_flight=args.max_in_flight,
             kv_reserved=_kv_reserved(p))
    if args.json:
        s["per_request"] = [{"arrival_us": r.request.arrival_us, "ttft_us": r.ttft_us,
                             "departures_us": r.departures_us} for r in res]
        print(json.dumps(s))
        return 0
    print(f"{s['model']} on {s['wafers']} x {s['hardware']}: {s['requests']} requests, {s['tokens']:,} tokens "
          f"over {s['span_s']:.2f} s simulated ({s['throughput_tokens_per_s']:,.0f} tok/s), "
          f"at most {min(args.max_in_flight, len(reqs))} in flight")
    print(f"  KV reserved for {p.context:,} tokens x {p.batch} sequence(s) = {p.kv_tokens:,} tokens")
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
    print("raising each assumed constant ~10% (a whole number by at least 1) changes tok/s by:")
    for row in sens:
        cells = "  ".join(f"{pt.model} {100 * row[pt.model]:+5.1f}%" for pt in calibrate.POINTS)
        step = f"{_value(row['constant'], row['from'])} -> {_value(row['constant'], row['to'])}"
        print(f"  {row['constant']:<22} {step:<20} ({100 * row['step']:+4.0f}%): {cells}")
    return 0


def _value(name: str, v: float) -> str:
    return f"{v / 1e9:g} GHz" if name.endswith("_hz") else f"{v:g}"


def main(argv: list[str] | None = None) -> int:
    """Run without the engine: `python -m sim.cli plan --model ...`."""
    parser = argparse.ArgumentParser(prog="wafer")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sim", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
