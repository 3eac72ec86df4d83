"""`wafer serve`: run the gRPC token-streaming server (a registry, or one --model) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC token-streaming server")
    p.add_argument("--config", metavar="REGISTRY.toml", help="model registry (default: smollm2-135m)")
    p.add_argument("--model", help="serve this one model (known name or .gguf path) instead of a registry")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus /metrics port (default 9400; -1 = off)")
    p.add_argument("--grace", type=float, default=None, help="SIGTERM drain grace period, s (default 10)")
    p.add_argument("--session-idle-timeout", type=float, default=None,
                   help="idle sessions expire after this many seconds (default 300)")
    p.add_argument("--emulate", default=None, metavar="HW:MODEL",
                   help="stamp/pace tokens on a simulated wafer, e.g. wse3:llama-3.1-8b")
    p.add_argument("--pace", choices=("realtime", "none"), default=None,
                   help="with --emulate: release tokens at their simulated time (realtime, the default) "
                        "or only stamp them (none)")
    p.add_argument("--max-queue-ms", type=float, default=None, metavar="MS",
                   help="refuse (RESOURCE_EXHAUSTED) a request whose estimated queue wait exceeds MS, "
                        "for every model (overrides the registry's max_queue_ms; 0 = no bound)")
    p.add_argument("--threads", type=int, default=None, help="Numba threads (default: all cores)")
    p.add_argument("--numerics", choices=("exact", "fast"), default=None,
                   help="exact: float32 activations (logits within 1e-3 of fp32); fast: int8 activations "
                        "and integer dot products, as llama.cpp (default exact; a model's own "
                        "`numerics` in the registry wins)")
    p.add_argument("--engine-nice", type=int, default=None,
                   help="niceness of the compute threads, so token streaming preempts them (default 5; 0 = off)")
    p.add_argument("--engine-sched-idle", action="store_true", default=None,
                   help="run the compute threads under SCHED_IDLE so any streaming thread (or a local "
                        "client) preempts them at once: about halves the p99 ITL overhead on small "
                        "machines, no privilege needed; for machines that do little besides serving")
    p.add_argument("--realtime-streaming", action="store_true", default=None,
                   help="run the threads that stream tokens under SCHED_RR so they never wait for a core "
                        "behind the compute (needs CAP_SYS_NICE; cuts the p99 ITL overhead on small machines)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="turn off automatic prefix caching (reusing the KV of equal prompt prefixes "
                        "across requests) for every model")
    sec = p.add_argument_group("security (default: plaintext, no token; the default host is loopback)")
    sec.add_argument("--tls-cert", metavar="FILE", help="serve gRPC and /metrics over TLS with this PEM "
                     "certificate chain (with --tls-key)")
    sec.add_argument("--tls-key", metavar="FILE", help="the certificate's PEM private key")
    sec.add_argument("--tls-client-ca", metavar="FILE", help="mutual TLS: clients must present a "
                     "certificate signed by this PEM CA")
    sec.add_argument("--auth-token-file", metavar="FILE",
                     help="require `authorization: Bearer <token>` on every call (health checks excepted) "
                          "and on /metrics; one accepted token per line. Also read: "
                          "WAFER_AUTH_TOKENS (comma-separated)")
    p.add_argument("--speculate", type=int, default=None, metavar="K",
                   help="default num_speculative_tokens of a request that leaves it unset: draft up "
                        "to K tokens per step by prompt lookup (default 0 = off; [0, 16])")
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=serve_cmd)


def builtin_entry(name: str):
    """The built-in registry's entry a name or alias means (with its aliases), or None: what
    `wafer serve --model NAME` serves."""
    from engine.server.registry import Registry, UnknownModel

    try:
        return Registry.builtin().lookup(name)
    except UnknownModel:
        return None


def serve_cmd(args: argparse.Namespace) -> int:
    from engine.server.app import ServerOptions, serve
    from engine.server.registry import ModelEntry, Registry, RegistryError

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.model and (known := builtin_entry(args.model)):  # a known name keeps its aliases
            registry = Registry([known])
        elif args.model:
            registry = Registry([ModelEntry(name=args.model, path=args.model)], default=args.model)
        elif args.config:
            registry = Registry.from_toml(args.config)
        else:
            registry = Registry.builtin()
    except (RegistryError, OSError) as e:
        print(f"wafer serve: error: {e}", file=sys.stderr)
        return 2
    if args.max_queue_ms is not None:
        if not 0 <= args.max_queue_ms < float("inf"):
            print(f"wafer serve: error: --max-queue-ms={args.max_queue_ms:g} must be >= 0 (0 = no bound)",
                  file=sys.stderr)
            return 2
        for e in registry.entries:
            e.max_queue_ms = args.max_queue_ms or None
    if not registry.served():
        print(f"wafer serve: error: every model in the registry is retired (or past its sunset): "
              f"{', '.join(registry.names())}; nothing to serve", file=sys.stderr)
        return 2
    if warning := registry.default_warning():
        print(f"wafer serve: warning: {warning}", file=sys.stderr)
    from engine.server.security import load_tokens

    if bool(args.tls_cert) != bool(args.tls_key):
        print("wafer serve: error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_client_ca and not args.tls_cert:
        print("wafer serve: error: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    try:
        tokens = load_tokens(args.auth_token_file)
    except (OSError, ValueError) as e:
        print(f"wafer serve: error: {e}", file=sys.stderr)
        return 2
    if args.auth_token_file and not tokens:
        print(f"wafer serve: error: {args.auth_token_file} holds no token", file=sys.stderr)
        return 2
    conf = registry.server
    pick = lambda flag, key, default: flag if flag is not None else conf.get(key, default)  # noqa: E731
    metrics_port = pick(args.metrics_port, "metrics_port", 9400)
    options = ServerOptions(
        host=pick(args.host, "host", "127.0.0.1"),
        port=pick(args.port, "port", 50051),
        metrics_port=None if metrics_port is not None and metrics_port < 0 else metrics_port,
        grace_s=pick(args.grace, "grace_s", 10.0),
        session_idle_timeout_s=pick(args.session_idle_timeout, "session_idle_timeout_s", 300.0),
        emulate=pick(args.emulate, "emulate", ""),
        pace=pick(args.pace, "pace", "realtime"),
        threads=pick(args.threads, "threads", None),
        numerics=pick(args.numerics, "numerics", "exact"),
        engine_nice=pick(args.engine_nice, "engine_nice", 5),
        engine_sched_idle=bool(pick(args.engine_sched_idle, "engine_sched_idle", False)),
        realtime_streaming=bool(pick(args.realtime_streaming, "realtime_streaming", False)),
        prefix_caching=bool(pick(args.prefix_caching, "prefix_caching", True)),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_tokens=tokens,
        speculate=pick(args.speculate, "speculate", 0),
    )
    if not 0 <= options.speculate <= 16:
        print(f"wafer serve: error: --speculate {options.speculate} must be in [0, 16] (0 = off)",
              file=sys.stderr)
        return 2
    if args.pace is not None and not options.emulate and not any(e.emulate for e in registry.served()):
        print("wafer serve: warning: --pace has no effect without --emulate (or a model's emulate)",
              file=sys.stderr)
    from engine.fetch import ModelNotFound, resolve_model

    for e in registry.served():
        try:
            resolve_model(e.path)
        except ModelNotFound as err:
            print(f"wafer serve: error: model {e.name!r}: {err}", file=sys.stderr)
            return 2
    if options.emulate or any(e.emulate for e in registry.served()):
        from engine.server.emulation import EmulationError, Emulator

        for e in registry.served():
            target, pace = options.emulate or e.emulate, e.pace or options.pace
            if not target:
                continue
            try:
                Emulator(target, pace)
            except EmulationError as err:
                print(f"wafer serve: error: {err}", file=sys.stderr)
                return 2
    try:
        return asyncio.run(serve(registry, options, args.ready_file))
    except OSError as e:
        print(f"wafer serve: error: {e}", file=sys.stderr)
        return 2
