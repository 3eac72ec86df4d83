"""What the CLIs print: tokens as they stream, the summary after them, warnings. Text for people
(tokens on stdout, summaries and warnings on stderr); with --json one JSON object per line on
stdout. Imports nothing from the rest of wafer, so every command can use it."""

from __future__ import annotations

import json
import sys


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
    """After a generation's tokens: a JSON summary, or a newline and a one-line summary on stderr."""
    summary = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "ttft_ms": round(ttft_ms, 3), "decode_tok_s": round(decode_tok_s, 2),
               "finish_reason": finish_reason, **(extra or {})}
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        sys.stdout.write("\n")
        print(f"[{completion_tokens} tokens, {finish_reason}; TTFT {ttft_ms:.1f} ms, "
              f"{decode_tok_s:.1f} tok/s]", file=sys.stderr)


def emit_turn_summary(args, finish_reason: str, usage: dict) -> None:
    """After a chat turn: its usage as JSON, or a one-line summary on stderr."""
    if args.json:
        print(json.dumps({"finish_reason": finish_reason, **usage}), flush=True)
    else:
        print(f"[{usage['completion_tokens']} tokens, {finish_reason}; prompt "
              f"{usage['prompt_tokens']} ({usage['cached_tokens']} reused); TTFT "
              f"{usage['ttft_ms']:.1f} ms]", file=sys.stderr)


def deprecation_warning(md: dict[str, str], model: str) -> str | None:
    """The warning a CLI prints for a deprecated model's metadata, or None."""
    if md.get("wafer-deprecated") != "true":
        return None
    msg = f"warning: model {model!r} is deprecated" if model else "warning: the server's default model is deprecated"
    if md.get("wafer-sunset"):
        msg += f" and retires on {md['wafer-sunset']}"
    if md.get("wafer-successor"):
        msg += f"; use {md['wafer-successor']!r}"
    return msg
