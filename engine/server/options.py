"""What a WaferServer is asked to do (the ``wafer serve`` flags), shared by app and runtime."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051                 # 0 = pick a free port
    metrics_port: int | None = 9400   # None = no metrics endpoint; 0 = pick a free port
    grace_s: float = 10.0             # SIGTERM: how long running streams may finish
    session_idle_timeout_s: float = 300.0
    emulate: str = ""                 # override every model's emulation target
    pace: str = "realtime"
    threads: int | None = None        # Numba threads
    numerics: str = "exact"           # models that name none: "exact" | "fast" (engine.model.Model)
    engine_nice: int = 0              # niceness of the engine thread and the compute threads it starts
    engine_sched_idle: bool = False   # those threads under SCHED_IDLE instead (no privilege needed)
    realtime_streaming: bool = False  # the threads that stream tokens under SCHED_RR (needs privilege)
    prefix_caching: bool = True       # False: off for every model (else each model's own setting)
    # security (engine.server.security), for the gRPC and the metrics port alike
    tls_cert: str | None = None       # PEM certificate chain: serve TLS (with tls_key)
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA: clients must present a certificate it signed (mTLS)
    auth_tokens: tuple[bytes, ...] = ()  # bearer tokens accepted; empty = no check
    speculate: int = 0                # num_speculative_tokens of a request that leaves it unset
