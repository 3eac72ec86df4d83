"""`wafer generate`: stream a completion from a local model, or from a server with --server."""

from __future__ import annotations

import argparse
import json
import sys


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
    p.add_argument("--threads", type=int, default=None, help="Numba threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="one JSON object per token, then a summary")
    p.add_argument("--server", metavar="HOST:PORT", help="stream from a running `wafer serve`")
    p.set_defaults(func=run)


def sampling_params(args: argparse.Namespace):
    from engine.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )


def emit(args, token_id: int, text: str, extra: dict | None = None) -> None:
    """One token: its text, or with --json {"id", "text"} and ``extra`` (e.g. the simulated
    wafer time of an emulating server)."""
    if args.json:
        print(json.dumps({"id": token_id, "text": text, **(extra or {})}), flush=True)
    elif text:
        sys.stdout.write(text)
        sys.stdout.flush()


def emit_summary(args, prompt_tokens, completion_tokens, ttft_ms, decode_tok_s, finish_reason,
                 extra: dict | None = None) -> None:
    summary = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "ttft_ms": round(ttft_ms, 3), "decode_tok_s": round(decode_tok_s, 2),
               "finish_reason": finish_reason, **(extra or {})}
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        sys.stdout.write("\n")
        print(f"[{completion_tokens} tokens, {finish_reason}; TTFT {ttft_ms:.1f} ms, "
              f"{decode_tok_s:.1f} tok/s]", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.server:
        from engine.server.client import generate_cli_remote

        return generate_cli_remote(args)
    from engine.fetch import resolve_model

    path = resolve_model(args.model or "smollm2-135m")
    params = sampling_params(args)
    from engine.generate import Generation, prompt_ids
    from engine.model import Model

    model = Model(path, max_batch=1, threads=args.threads)
    model.warmup()
    try:
        gen = Generation(model, prompt_ids(model, args.prompt, args.raw), params)
    except ValueError as e:
        print(f"wafer generate: error: {e}", file=sys.stderr)
        return 2
    for tok in gen:
        emit(args, tok.id, tok.text)
    s = gen.stats
    emit_summary(args, s.prompt_tokens, s.completion_tokens, s.ttft_s * 1e3, s.decode_tok_s, s.finish_reason)
    return 0
