"""`wafer generate`: stream a completion from a local model, or from a server with --server."""

from __future__ import annotations

import argparse
import sys

from engine.cli.output import deprecation_warning, emit, emit_summary
from engine.cli.remote import add_connection_arguments, client_kwargs


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion (local model, or --server)")
    p.add_argument("--model", default=None,
                   help="known model name or path to a .gguf (default smollm2-135m; with --server: "
                        "a name the server serves, default the server's default model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="speculative decoding by prompt lookup: draft up to K tokens per step "
                        "(0 = off; default: off locally, the server's default with --server)")
    p.add_argument("--threads", type=int, default=None, help="Numba threads (default: all cores)")
    p.add_argument("--numerics", choices=("exact", "fast"), default=None,
                   help="local model: exact (float32 activations, the default) or fast (int8 activations, "
                        "integer dot products); a server's models have theirs (ModelInfo.numerics)")
    p.add_argument("--json", action="store_true", help="one JSON object per token, then a summary")
    p.add_argument("--server", metavar="HOST:PORT", help="stream from a running `wafer serve`")
    add_connection_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.server and args.numerics:
        print("wafer generate: error: --numerics applies to a local model; a server's model has its own "
              "(wafer serve --numerics)", file=sys.stderr)
        return 2
    return run_remote(args) if args.server else run_local(args)


def sampling_params(args: argparse.Namespace):
    from engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=tuple(args.stop), num_speculative_tokens=args.speculate or 0,
    )


def run_local(args: argparse.Namespace) -> int:
    """`wafer generate [--model M]`: load the model in this process and decode one stream."""
    from engine.fetch import resolve_model

    path = resolve_model(args.model or "smollm2-135m")
    params = sampling_params(args)
    from engine.generate import Generation, prompt_ids
    from engine.model import Model

    model = Model(path, max_batch=1, threads=args.threads, numerics=args.numerics or "exact")
    model.warmup()
    try:
        gen = Generation(model, prompt_ids(model, args.prompt, args.raw), params)
    except ValueError as e:
        print(f"wafer generate: error: {e}", file=sys.stderr)
        return 2
    for tok in gen:
        emit(args, tok.id, tok.text)
    s = gen.stats
    spec = ({"spec_steps": s.spec_steps, "spec_draft_tokens": s.spec_draft_tokens,
             "spec_accepted_tokens": s.spec_accepted_tokens,
             "spec_acceptance_rate": round(s.acceptance_rate, 4),
             "spec_mean_accepted_length": round(s.mean_accepted_length, 4)} if args.speculate else None)
    emit_summary(args, s.prompt_tokens, s.completion_tokens, s.ttft_s * 1e3, s.decode_tok_s,
                 s.finish_reason, spec)
    return 0


def run_remote(args: argparse.Namespace) -> int:
    """`wafer generate --server HOST:PORT ...`: same output as the local mode."""
    import grpc

    from engine.client import Token, WaferClient, generate_request

    kw = dict(model=args.model or "", max_tokens=args.max_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              min_p=getattr(args, "min_p", None),
              repetition_penalty=getattr(args, "repetition_penalty", None), seed=args.seed,
              stop=list(getattr(args, "stop", []) or []),
              num_speculative_tokens=getattr(args, "speculate", None))
    if args.raw:
        kw["prompt"] = args.prompt
    else:
        kw["messages"] = [{"role": "user", "content": args.prompt}]
    try:
        request = generate_request(**kw)
        conn = client_kwargs(args)
    except (ValueError, OSError) as e:  # a value the request's field cannot hold; a token file
        print(f"wafer generate: error: {e}", file=sys.stderr)
        return 2
    try:
        with WaferClient(args.server, **conn) as client:
            for item in client.generate(request=request):
                if isinstance(item, Token):
                    emulated = item.sim_time_us is not None
                    emit(args, item.id, item.text,
                         {"sim_time_us": item.sim_time_us, "late_us": item.late_us} if emulated else None)
                else:
                    if item.text and not args.json:
                        sys.stdout.write(item.text)
                    u = item.usage
                    n = u["completion_tokens"]
                    decode_s = u["mean_itl_ms"] * (n - 1) / 1e3
                    tok_s = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
                    extra = {"emulation": item.emulation} if item.emulation else {}
                    if u.get("spec_steps"):
                        extra.update((k, v) for k, v in u.items() if k.startswith("spec_"))
                    emit_summary(args, u["prompt_tokens"], n, u["ttft_ms"], tok_s, item.finish_reason,
                                 extra or None)
                    warning = deprecation_warning(item.trailing_metadata, args.model or "")
                    if warning:  # after the text and its summary, on a line of its own
                        print(f"wafer generate: {warning}", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"wafer generate: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    return 0
