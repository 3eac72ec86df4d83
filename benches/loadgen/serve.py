"""`wafer bench serve`: load a wafer.v1 server and report what its clients would see.

    wafer bench serve --model smollm2-135m --num-prompts 20 --input-len 64 --output-len 32 --max-concurrency 4
    wafer bench serve --server 127.0.0.1:50051 --request-rate 2 --burstiness 0.5 --goodput ttft:500 tpot:50
    wafer bench serve --server ADDR --sweep 6 --save-result --plot      # GuideLLM's sweep, JSON + PNGs
    wafer bench serve --server ADDR --dataset-path chats.jsonl          # {"messages": [...]} per line

The JSON has `vllm bench serve`'s keys (see benches/loadgen/report.py): compare with vLLM runs.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

from benches.loadgen.server import add_target_arguments, target_address


def add_arguments(p) -> None:
    add_target_arguments(p)
    p.add_argument("--model-name", default="", help="the model requests name (default: the server's default)")
    d = p.add_argument_group("prompts")
    d.add_argument("--num-prompts", type=int, default=50, help="requests per run (default 50)")
    d.add_argument("--dataset-path", metavar="FILE.jsonl",
                   help='JSONL, one {"messages": [...], "max_tokens": N?} a line (default: random token ids)')
    d.add_argument("--shuffle", action="store_true", help="with --dataset-path: shuffle the lines (--seed)")
    d.add_argument("--input-len", type=int, default=128, help="random prompts' input tokens (default 128)")
    d.add_argument("--output-len", type=int, default=None,
                   help="max_tokens per request (default 64 for random prompts; the dataset's or server's else)")
    d.add_argument("--range-ratio", type=float, default=0.0,
                   help="random lengths uniform in len*(1 +- ratio), [0, 1) (default 0: exact)")
    d.add_argument("--seed", type=int, default=0, help="prompts and arrivals (default 0)")
    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", type=float, default=math.inf,
                   help="open loop: requests/s (default inf: all at once)")
    t.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrivals: 1 = Poisson, <1 burstier, >1 more even (default 1)")
    t.add_argument("--max-concurrency", type=int, default=None, help="closed loop: at most N requests in flight")
    t.add_argument("--sweep", type=int, default=None, metavar="N",
                   help="N runs: synchronous, throughput, then N-2 Poisson rates between (GuideLLM's sweep)")
    t.add_argument("--num-warmups", type=int, default=0, help="requests sent (and ignored) first (default 0)")
    t.add_argument("--request-timeout", type=float, default=600.0, help="per-request deadline, s (default 600)")
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=None, help="(default: the server's, 1.0; 0 = greedy)")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--coalesce", type=int, default=1, help="tokens per streamed message (default 1)")
    r = p.add_argument_group("report")
    r.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for request_goodput: ttft:MS tpot:MS e2el:MS")
    r.add_argument("--metric-percentiles", default="90,99", help="percentiles reported (default 90,99)")
    r.add_argument("--label", default=None, help="the run's label (default: from the traffic)")
    r.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="extra keys in the JSON")
    r.add_argument("--save-result", action="store_true", help="write the result JSON (one file per sweep run)")
    r.add_argument("--result-dir", default=None, help="where results and plots go (default: .)")
    r.add_argument("--result-filename", default=None, help="(default: vLLM's <backend>-<rate>qps-<model>-<date>.json)")
    r.add_argument("--plot", action="store_true", help="write latency-vs-throughput and CDF PNGs")
    r.add_argument("--json", action="store_true", help="print the result JSON (a list for a sweep), not tables")
    r.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def check(args) -> dict:
    """Validate the arguments; returns the goodput SLOs. ValueError names the flag."""
    from benches.loadgen.metrics import parse_goodput

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts={args.num_prompts} must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency={args.max_concurrency} must be at least 1")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate={args.request_rate} must be > 0 (inf = all at once)")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness={args.burstiness} must be > 0 (1 = Poisson)")
    if args.sweep is not None and args.sweep < 2:
        raise ValueError(f"--sweep={args.sweep} must be at least 2 (synchronous and throughput)")
    if args.sweep is not None and not math.isinf(args.request_rate):
        raise ValueError("--sweep chooses the rates itself: drop --request-rate")
    if not 0 <= args.range_ratio < 1:
        raise ValueError(f"--range-ratio={args.range_ratio} must be in [0, 1)")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups={args.num_warmups} must be >= 0")
    for item in args.metadata:
        if "=" not in item:
            raise ValueError(f"--metadata {item!r}: expected KEY=VALUE")
    args.percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    if not all(0 < p <= 100 for p in args.percentiles):
        raise ValueError(f"--metric-percentiles={args.metric_percentiles}: each must be in (0, 100]")
    return parse_goodput(args.goodput or [])


def run(args) -> int:
    try:
        goodput = check(args)
        with target_address(args) as address:
            results = asyncio.run(bench(args, address, goodput))
    except (ValueError, RuntimeError, OSError) as e:
        print(f"wafer bench serve: error: {e}", file=sys.stderr)
        return 2
    return output(args, results)


def prompts_maker(args, vocab_size: int):
    from benches.loadgen.dataset import load_jsonl, random_prompts

    def make(k: int, n: int | None = None):
        n, seed = n or args.num_prompts, args.seed + 7919 * (k + 1)
        if args.dataset_path:
            return load_jsonl(args.dataset_path, n, args.output_len, args.shuffle, seed)
        return random_prompts(n, args.input_len, args.output_len or 64, vocab_size, args.range_ratio, seed)
    return make


async def bench(args, address: str, goodput: dict) -> list[dict]:
    from benches.loadgen import report, runner
    from engine.cli.remote import client_kwargs
    from engine.client import AsyncWaferClient

    async with AsyncWaferClient(address, **client_kwargs(args)) as client:
        info = await loaded_model(client, args.model_name, address)
        make = prompts_maker(args, info.vocab_size)
        sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                      ("top_k", args.top_k)) if v is not None}
        send_kw = dict(model=args.model_name, coalesce=args.coalesce, timeout=args.request_timeout, **sampling)
        if args.num_warmups:
            warm = await runner.run_load(client, make(-1, args.num_warmups), max_concurrency=args.max_concurrency,
                                         **send_kw)
            print(f"warm-up: {sum(r.success for r in warm.records)}/{args.num_warmups} requests completed",
                  file=sys.stderr)
        bar = progress_bar_factory(args.disable_tqdm)
        if args.sweep:
            runs = await runner.sweep(client, make, args.sweep, burstiness=args.burstiness,
                                      max_concurrency=args.max_concurrency, seed=args.seed,
                                      progress_for=bar, **send_kw)
        else:
            prompts = make(0)
            label = args.label or runner.default_label(args.request_rate, args.burstiness, args.max_concurrency)
            b = bar(label, len(prompts))
            runs = [await runner.run_load(client, prompts, request_rate=args.request_rate, burstiness=args.burstiness,
                                          max_concurrency=args.max_concurrency, seed=args.seed, label=label,
                                          progress=b, **send_kw)]
            if b is not None:
                b.close()
    extra = dict(kv.split("=", 1) for kv in args.metadata)
    return [report.result_json(r, model_id=info.name, server=address, percentiles=args.percentiles,
                               goodput_ms=goodput, coalesce=args.coalesce, sim_target=info.emulate, extra=extra)
            for r in runs]


async def loaded_model(client, name: str, address: str, timeout_s: float = 600.0):
    """The model's ModelInfo once it is loaded (a server still loading says loaded=false)."""
    import grpc

    t0 = time.monotonic()
    while True:
        try:
            info = await client.get_model(name)
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(f"{address}: GetModel({name!r}) failed: {e.code().name}: {e.details()}") from None
        if info.loaded and info.vocab_size:
            return info
        if info.lifecycle.status == "retired" or time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"{address}: model {info.name!r} is not loaded ({info.lifecycle.status})")
        await asyncio.sleep(0.5)


def progress_bar_factory(disabled: bool):
    def make(label: str, total: int):
        if disabled:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False)
    return make


def output(args, results: list[dict]) -> int:
    import json

    from benches.loadgen import report

    if args.json:
        print(json.dumps(results if args.sweep else results[0], indent=2))
    else:
        for r in results:
            report.print_result(r, sys.stdout)
        if len(results) > 1:
            report.print_sweep(results, sys.stdout)
    paths = []
    if args.save_result:
        for k, r in enumerate(results):
            paths.append(report.write_result(r, report.result_path(
                args.result_dir, args.result_filename, r, k if args.sweep else None)))
    if args.plot:
        from benches.loadgen.plot import plot_results

        stem = report.plot_stem(args.result_filename, results)
        paths += plot_results(results, Path(args.result_dir or "."), stem)
    for p in paths:
        print(f"wrote {p}", file=sys.stderr)
    return 0
