"""`wafer bench sessions`: a multi-turn coding chat three ways, to test the claim for persistent
sessions ("overhead per client/server round trip -80%, per-token overhead -30%, time to first
token -50%", published for a persistent WebSocket connection):

    fresh    a new channel (connection) per turn, the whole conversation sent each turn
    reused   one channel for every turn, the whole conversation sent each turn (the server's
             prefix cache finds the previous turn's KV: only the new tokens are prefilled)
    session  one Session stream, only the new user message sent; the server keeps the KV cache
    uncached (with --uncached) as reused, to the same model served without prefix caching:
             every turn prefills the whole conversation

    wafer bench sessions --model smollm2-135m                 # a local server
    wafer bench sessions --model smollm2-135m --uncached      # + the model without prefix caching
    wafer bench sessions --server 127.0.0.1:50051 --rounds 3 --json
    wafer bench sessions --server HOST:PORT --uncached-model NAME   # NAME: prefix_caching = false

The modes are interleaved turn by turn (the order rotates every turn), never run one after the
other, so a machine getting busier hurts all three alike. Greedy, max 24 tokens per answer, one
token per message. Each mode keeps its own conversation (its own answers appended), opened by a
system message naming the round and the mode: the server's prefix cache is shared by all
requests, so without it a stateless mode would find blocks that another mode (or an earlier
round) computed for the same text, which no single client gets; a Session, which continues only
its own KV, would look slower than it is. (Greedy answers may then differ a little by mode.)

Per turn, from the client's receive times r_i and the engine time s_i each token carries
(engine_step_ns: the decode step, or for the first token its prefill):
  TTFT                 r_0 - request sent (for fresh: connection set-up included)
  round-trip overhead  client e2e - sum(s_i): everything but the engine's compute
  per-token overhead   (r_i - r_{i-1}) - s_i for i >= 1
Ratios are session/fresh and reused/fresh of the medians, measured in the same run, and
reused/session (the prefix cache's goal: a stateless client's TTFT near the session's).

Why a subcommand rather than a pytest-benchmark module: what is measured are latencies inside
streams against any server (local or remote), not a function's run time, and users want it from
the same `wafer bench` they run serve from; it reports and never asserts, like the benches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

from benches.loadgen.server import add_target_arguments, target_address

CONVERSATION = [
    "Write a Python function is_palindrome(s) that checks whether a string is a palindrome.",
    "Make it ignore spaces and punctuation.",
    "Make it case-insensitive too.",
    "Add type hints and a one-line docstring.",
    "Now write two pytest tests for it.",
    "Rewrite the function without slicing, using two indices.",
    "What is the time complexity of that version?",
    "Turn it into a command-line script that reads the text from sys.argv.",
    "Print a helpful message when no argument is given.",
    "Summarize what the final script does in one sentence.",
]
MODES = ("fresh", "reused", "session")
UNCACHED = "uncached"
PUBLISHED = {"ttft": 0.5, "roundtrip_overhead": 0.2, "token_overhead": 0.7}  # persistent WebSocket


def add_arguments(p) -> None:
    add_target_arguments(p)
    p.add_argument("--model-name", default="", help="the model requests name (default: the server's default)")
    p.add_argument("--rounds", type=int, default=1, help="conversations per mode (default 1)")
    p.add_argument("--turns", type=int, default=len(CONVERSATION),
                   help=f"user turns per conversation, at most {len(CONVERSATION)} (default all)")
    p.add_argument("--max-tokens", type=int, default=24, help="per answer (default 24)")
    p.add_argument("--uncached", action="store_true",
                   help="with --model: add the mode 'uncached' (the same model served without prefix "
                        "caching, under the name MODEL-uncached)")
    p.add_argument("--uncached-model", metavar="NAME",
                   help="with --server: add the mode 'uncached' sending to NAME (a model the server "
                        "serves with prefix_caching = false)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save-result", metavar="FILE.json", help="also write the result JSON")


def run(args) -> int:
    if not 1 <= args.turns <= len(CONVERSATION) or args.rounds < 1 or args.max_tokens < 1:
        print(f"wafer bench sessions: error: --turns must be in [1, {len(CONVERSATION)}], --rounds and "
              f"--max-tokens at least 1", file=sys.stderr)
        return 2
    import grpc

    from engine.cli.remote import client_kwargs

    if (args.uncached and not args.model) or (args.uncached_model and not args.server):
        print("wafer bench sessions: error: --uncached goes with --model, --uncached-model with --server",
              file=sys.stderr)
        return 2
    uncached = args.uncached_model or (f"{args.model_name or 'bench'}-uncached" if args.uncached else "")
    try:
        with _uncached_registry(args) as target, target_address(target) as address:
            records = asyncio.run(measure(address, args.model_name, args.rounds, args.turns, args.max_tokens,
                                          client_kwargs(args), uncached))
    except grpc.RpcError as e:  # the warm-up or a session open refused
        print(f"wafer bench sessions: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as e:
        print(f"wafer bench sessions: error: {e}", file=sys.stderr)
        return 2
    result = summarize(records)
    result.update(rounds=args.rounds, turns=args.turns, max_tokens=args.max_tokens, server=address)
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump(_no_nan(result), f, indent=2)
    if args.json:
        print(json.dumps(_no_nan(result), indent=2))
    else:
        print_table(result, sys.stdout)
    failed = sum(m["failed"] for m in result["modes"].values())
    return 1 if failed else 0


def _no_nan(x):
    """NaN (a mode without a completed turn, a ratio to an overhead <= 0) as JSON null."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and x != x else x


@contextlib.contextmanager
def _uncached_registry(args):
    """With --uncached: a local server given a registry of the model twice, the second (its own
    engine) without prefix caching; else the arguments as they are."""
    if not args.uncached:
        yield args
        return
    import argparse
    import shlex
    import tempfile

    name = args.model_name or "bench"
    path = args.model
    with tempfile.TemporaryDirectory(prefix="wafer-bench-sessions-") as tmp:
        toml = Path(tmp) / "registry.toml"
        toml.write_text(f'default = "{name}"\n'
                        f'[[models]]\nname = "{name}"\npath = {json.dumps(path)}\n'
                        f'[[models]]\nname = "{name}-uncached"\npath = {json.dumps(path)}\n'
                        f'prefix_caching = false\n')
        # `wafer serve --config` (the bench's --model would serve only the one model)
        ns = argparse.Namespace(**vars(args))
        ns.serve_args = f"--config {shlex.quote(str(toml))} {args.serve_args}"
        ns.model = ""  # empty: serve reads the registry
        yield ns


def system_message(round_: int, mode_index: int) -> dict:
    """The message that opens a conversation: the same length in every mode, distinct tokens."""
    return {"role": "system", "content": f"You are a helpful coding assistant. Conversation {round_ + 1}.{mode_index + 1}"}


async def measure(address: str, model: str, rounds: int, turns: int, max_tokens: int,
                  conn: dict | None = None, uncached: str = "") -> dict[str, list]:
    """Per mode, one RequestRecord per turn (interleaved); ``uncached``: the model name of the
    mode 'uncached' (none without it)."""
    from benches.loadgen.metrics import RequestRecord
    from benches.loadgen.runner import collect
    from benches.loadgen.serve import loaded_model
    from engine.client import AsyncWaferClient

    kw = dict(max_tokens=max_tokens, temperature=0)
    modes = MODES + ((UNCACHED,) if uncached else ())
    out = {m: [] for m in modes}
    conn = conn or {}
    async with AsyncWaferClient(address, timeout=600, **conn) as reused, \
            AsyncWaferClient(address, timeout=600, **conn) as sess_ch:
        await loaded_model(reused, model, address)
        await reused.complete(messages=[{"role": "user", "content": "Hi"}], max_tokens=2, model=model)  # connect
        for r in range(rounds):
            history = {m: [system_message(r, i)] for i, m in enumerate(modes)}
            session = await sess_ch.session(model)
            try:
                for t in range(turns):
                    user = {"role": "user", "content": CONVERSATION[t]}
                    k = (t + r) % len(modes)
                    for mode in modes[k:] + modes[:k]:  # rotate who goes first
                        rec = RequestRecord(t)
                        msgs = history[mode] + [user]
                        rec.start_ns = time.monotonic_ns()
                        if mode == "fresh":
                            async with AsyncWaferClient(address, timeout=600, **conn) as fresh:  # new connection
                                await collect(fresh.generate(messages=msgs, model=model, **kw), rec)
                        elif mode == "reused":
                            await collect(reused.generate(messages=msgs, model=model, **kw), rec)
                        elif mode == UNCACHED:
                            await collect(reused.generate(messages=msgs, model=uncached, **kw), rec)
                        else:  # only the new message (the first turn: the system message too)
                            await collect(session.turn(messages=msgs if t == 0 else [user], **kw), rec)
                        history[mode] = msgs + [{"role": "assistant", "content": rec.generated_text}]
                        out[mode].append(rec)
            finally:
                await session.close()
    return out


def per_turn(rec) -> dict:
    """TTFT, round-trip and per-token overheads of one turn (ms)."""
    steps = rec.step_ns
    tok = [itl * 1e3 - s / 1e6 for itl, s in zip(rec.itls, steps[1:])]
    return {"ttft_ms": rec.ttft * 1e3, "e2e_ms": rec.e2el * 1e3, "engine_ms": sum(steps) / 1e6,
            "roundtrip_overhead_ms": rec.e2el * 1e3 - sum(steps) / 1e6,
            "ttft_overhead_ms": rec.ttft * 1e3 - steps[0] / 1e6, "token_overheads_ms": tok,
            "outside_server_ms": rec.e2el * 1e3 - rec.usage.get("e2e_ms", 0.0),
            "prompt_tokens": rec.usage.get("prompt_tokens", 0), "prefill_tokens": rec.usage.get("prefill_tokens", 0),
            "cached_tokens": rec.usage.get("cached_tokens", 0), "output_tokens": rec.n_out, "text": rec.generated_text}


def summarize(records: dict[str, list]) -> dict:
    import numpy as np

    modes = {}
    for mode, recs in records.items():
        ok = [per_turn(r) for r in recs if r.success]
        p = lambda key, q: float(np.percentile([x[key] for x in ok], q)) if ok else float("nan")  # noqa: E731
        toks = [v for x in ok for v in x["token_overheads_ms"]]
        modes[mode] = {
            "turns": len(recs), "failed": len(recs) - len(ok),
            "errors": sorted({f"{r.error_code}: {r.error}" for r in recs if not r.success}),
            "ttft_p50_ms": p("ttft_ms", 50), "ttft_p90_ms": p("ttft_ms", 90),
            "ttft_overhead_p50_ms": p("ttft_overhead_ms", 50),
            "roundtrip_overhead_p50_ms": p("roundtrip_overhead_ms", 50),
            "roundtrip_overhead_p90_ms": p("roundtrip_overhead_ms", 90),
            "outside_server_p50_ms": p("outside_server_ms", 50),
            "token_overhead_p50_ms": float(np.median(toks)) if toks else float("nan"),
            "token_overhead_mean_ms": float(np.mean(toks)) if toks else float("nan"),
            "e2e_p50_ms": p("e2e_ms", 50),
            "prefill_tokens_mean": float(np.mean([x["prefill_tokens"] for x in ok])) if ok else 0.0,
            "cached_tokens_mean": float(np.mean([x["cached_tokens"] for x in ok])) if ok else 0.0,
            "texts": [x["text"] for x in ok],
        }
    keys = {"ttft": "ttft_p50_ms", "roundtrip_overhead": "roundtrip_overhead_p50_ms",
            "token_overhead": "token_overhead_p50_ms"}
    ratio = lambda a, b: a / b if b > 0 else float("nan")  # noqa: E731  (an overhead can be <= 0)
    pairs = [("session", "fresh"), ("reused", "fresh"), ("reused", "session")]
    if UNCACHED in modes:
        pairs += [(UNCACHED, "session"), ("reused", UNCACHED)]
    ratios = {f"{a}/{b}": {k: ratio(modes[a][v], modes[b][v]) for k, v in keys.items()} for a, b in pairs}
    same = sum(len(set(t)) == 1 for t in zip(*(modes[m]["texts"] for m in modes)))
    return {"modes": modes, "ratios": ratios, "published": PUBLISHED, "same_answers": same}


def print_table(r: dict, f) -> None:
    print(f"multi-turn coding chat: {r['turns']} turns x {r['rounds']} round(s), greedy, max {r['max_tokens']} "
          f"tokens per answer, modes interleaved; server {r['server']}", file=f)
    print(f"{'mode':<9}{'TTFT p50':>9}{'TTFT p90':>9}{'TTFT ovh':>9}{'RTT ovh':>9}{'outside':>9}{'tok ovh':>9}"
          f"{'tok mean':>9}{'prefill':>9}{'cached':>8}{'failed':>7}", file=f)
    print(f"{'':<9}{'ms':>9}{'ms':>9}{'p50 ms':>9}{'p50 ms':>9}{'server':>9}{'p50 ms':>9}{'ms':>9}"
          f"{'tok/turn':>9}{'tok':>8}", file=f)
    for mode, m in r["modes"].items():
        print(f"{mode:<9}{m['ttft_p50_ms']:>9.1f}{m['ttft_p90_ms']:>9.1f}{m['ttft_overhead_p50_ms']:>9.2f}"
              f"{m['roundtrip_overhead_p50_ms']:>9.2f}{m['outside_server_p50_ms']:>9.2f}"
              f"{m['token_overhead_p50_ms']:>9.3f}{m['token_overhead_mean_ms']:>9.3f}"
              f"{m['prefill_tokens_mean']:>9.0f}{m['cached_tokens_mean']:>8.0f}{m['failed']:>7}", file=f)
    print(f"\n{'ratio of medians':<18}{'TTFT':>8}{'round-trip ovh':>16}{'per-token ovh':>15}", file=f)
    for name, x in list(r["ratios"].items()) + [("published", r["published"])]:
        print(f"{name:<18}{x['ttft']:>7.2f}x{x['roundtrip_overhead']:>15.2f}x{x['token_overhead']:>14.2f}x", file=f)
    print(f"(published: persistent WebSocket vs fresh requests; answers identical in all {len(r['modes'])} modes: "
          f"{r['same_answers']}/{r['turns'] * r['rounds']} turns)", file=f)
    for mode, m in r["modes"].items():
        for e in m["errors"]:
            print(f"{mode}: {e}", file=f)
