"""`wafer chat --server HOST:PORT`: an interactive persistent session with a running server."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from engine.cli.output import deprecation_warning, emit, emit_turn_summary
from engine.cli.remote import add_connection_arguments, client_kwargs


def add_parsers(sub) -> None:
    c = sub.add_parser("chat", help="interactive persistent session with a running server")
    c.add_argument("--server", required=True, metavar="HOST:PORT")
    c.add_argument("--model", default="", help="model name (default: the server's default)")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="speculative decoding by prompt lookup: draft up to K tokens per step "
                        "(0 = off; default: the server's)")
    c.add_argument("--json", action="store_true", help="one JSON object per token, then a summary per turn")
    add_connection_arguments(c)
    c.set_defaults(func=chat_cmd)


def chat_cmd(args: argparse.Namespace) -> int:
    """Read stdin lines, one turn each. A turn the server rejects (e.g. the conversation outgrew
    the context) is reported and the session goes on; a closed session or a gRPC error ends it."""
    import grpc

    from engine.client import SessionError, WaferClient, sampling

    interactive = sys.stdin.isatty()
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
              num_speculative_tokens=args.speculate)
    try:
        sampling(**kw)
        conn = client_kwargs(args)
    except (ValueError, OSError) as e:
        print(f"wafer chat: error: {e}", file=sys.stderr)
        return 2
    try:
        with WaferClient(args.server, **conn) as client, client.session(args.model) as s:
            if interactive:
                print(f"session {s.session_id} with {s.model}; empty line or Ctrl-D to quit",
                      file=sys.stderr)
            lifecycle = client.get_model(s.model).lifecycle
            if lifecycle.status == "deprecated":
                md = {"wafer-deprecated": "true", "wafer-sunset": lifecycle.sunset,
                      "wafer-successor": lifecycle.successor}
                print(f"wafer chat: {deprecation_warning(md, s.model)}", file=sys.stderr)
            while True:
                if interactive:
                    sys.stderr.write("> ")
                    sys.stderr.flush()
                try:
                    line = sys.stdin.readline()
                except KeyboardInterrupt:  # Ctrl-C at the prompt: leave, closing the session
                    line = ""
                if not line or (interactive and not line.strip()):
                    break
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                try:
                    done = _chat_turn(args, s, line, kw)
                except SessionError as e:
                    if e.code == "CLOSED":
                        raise
                    print(f"wafer chat: turn rejected: {e}", file=sys.stderr)
                    continue
                emit_turn_summary(args, done.finish_reason, done.usage)
    except grpc.RpcError as e:
        print(f"wafer chat: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except SessionError as e:
        print(f"wafer chat: error: {e}", file=sys.stderr)
        return 2
    return 0


def _chat_turn(args, s, line: str, kw: dict):
    """One turn of the SyncSession ``s``, printed as it streams; returns its Completion. Ctrl-C
    cancels the turn on the server (which ends it with a final, so the session goes on); a second
    Ctrl-C interrupts as usual. The handler only sends the cancel: a KeyboardInterrupt raised
    inside gRPC's blocking read would leave the session's stream unusable."""
    from engine.client import Token

    done = None

    def cancel_turn(signum, frame):
        signal.signal(signal.SIGINT, previous)
        s.cancel()

    main = threading.current_thread() is threading.main_thread()  # where signals are handled
    previous = signal.signal(signal.SIGINT, cancel_turn) if main else None
    try:
        for item in s.turn(messages=[{"role": "user", "content": line}], **kw):
            if isinstance(item, Token):
                emit(args, item.id, item.text)
            else:
                done = item
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return done
