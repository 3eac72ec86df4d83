"""The wafer gRPC server: binds grpc.aio (the Wafer service, health, reflection) and the metrics
endpoint, starts a ModelRuntime per engine, says SERVING once they are ready, drains on SIGTERM.

    server = WaferServer(Registry.builtin(), ServerOptions(port=50051, metrics_port=9400))
    await server.start()          # binds, starts loading models (health NOT_SERVING)
    await server.wait_ready()     # models loaded and warmed (health SERVING)
    await server.drain()          # SIGTERM: stop taking work, let streams finish, then cancel
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine import scheduler as sch
from engine.server.metrics import Metrics
from engine.server.options import ServerOptions
from engine.server.parse import add_wafer_service
from engine.server.reflection import enable_reflection
from engine.server.registry import ModelEntry, Registry
from engine.server.runtime import ModelRuntime
from engine.server.security import BearerAuth, server_credentials, ssl_context
from engine.server.servicer import SERVICE_NAME, WaferServicer
from engine.server.threads import grpc_threads, realtime_threads
from protos import wafer_pb2

log = logging.getLogger("wafer.server")

__all__ = ["ServerOptions", "WaferServer", "serve"]

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SWITCH_INTERVAL_S = 0.0005
SHUTDOWN_FINALS_S = 30.0  # after the grace: waiting for the engines' current steps and the finals

# Keepalive: the server pings idle connections every 60 s; clients may ping as often as every
# 10 s even with no call in flight and are never punished for it (max_ping_strikes=0), so a
# client waiting through a long prefill keeps its connection.
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


class WaferServer:
    def __init__(self, registry: Registry, options: ServerOptions | None = None):
        self.registry = registry
        self.options = options or ServerOptions()
        self.metrics = Metrics() if self.options.metrics_port is not None else None
        self.runtimes: dict[tuple, ModelRuntime] = {}
        self._rt_by_name = {}
        for e in registry.served():
            key = e.engine_key() + (self.emulate_target(e), self.pace_of(e))
            if key not in self.runtimes:
                self.runtimes[key] = ModelRuntime(e, self.options, self.metrics, self.emulate_target(e),
                                                  self.pace_of(e))
            self._rt_by_name[e.name] = self.runtimes[key]
        self.draining = False
        self.servicer = WaferServicer(self)
        self.health = health.aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._stopped = asyncio.Event()
        self._hurry = asyncio.Event()  # a second signal while draining: no more grace

    def emulate_target(self, entry: ModelEntry) -> str:
        return self.options.emulate or entry.emulate

    def pace_of(self, entry: ModelEntry) -> str:
        return entry.pace or self.options.pace

    def runtime_for(self, entry: ModelEntry) -> ModelRuntime | None:
        return self._rt_by_name.get(entry.name)

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return bool(self.options.tls_cert)

    def _count_unauthenticated(self, method: str) -> None:
        if self.metrics is not None:
            self.metrics.request_errors.labels("unknown", "UNAUTHENTICATED").inc()

    async def start(self) -> None:
        o = self.options
        if bool(o.tls_cert) != bool(o.tls_key):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if o.tls_client_ca and not o.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        creds = server_credentials(o.tls_cert, o.tls_key, o.tls_client_ca) if self.tls else None
        metrics_tls = ssl_context(o.tls_cert, o.tls_key, o.tls_client_ca) if self.tls else None
        interceptors = [BearerAuth(o.auth_tokens, self._count_unauthenticated)] if o.auth_tokens else []
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        # the generated handlers, with request parsing that refuses a bad message itself
        add_wafer_service(self.servicer, server, self.servicer.refuse_unparsable)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection((wafer_pb2.DESCRIPTOR.services_by_name["Wafer"].full_name,
                           health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        where = f"{self.options.host}:{self.options.port}"
        try:
            self.port = server.add_secure_port(where, creds) if creds else server.add_insecure_port(where)
        except RuntimeError as e:  # grpcio raises this when the address is taken
            raise OSError(f"cannot bind the gRPC port {where} (in use?): {e}") from None
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {where}")
        await server.start()
        self.grpc_server = server
        if self.metrics is not None:
            try:
                self.metrics_port = self.metrics.serve(self.options.metrics_port, self.options.host,
                                                       metrics_tls, o.auth_tokens)
            except OSError as e:
                await server.stop(0)
                raise OSError(f"cannot bind the metrics port {self.options.host}:{self.options.metrics_port}: "
                              f"{e.strerror or e}") from None
        scheme = "https" if self.tls else "http"
        log.info("listening on %s (%s%s; metrics %s); loading %d model(s)", self.address,
                 ("mutual TLS" if o.tls_client_ca else "TLS") if self.tls else "plaintext",
                 ", bearer token required" if o.auth_tokens else "",
                 f"{scheme}://{self.options.host}:{self.metrics_port}/metrics" if self.metrics else "off",
                 len(self.runtimes))
        if not is_loopback(o.host) and not (self.tls or o.auth_tokens):
            log.warning("listening on %s without TLS or a bearer token: anyone who reaches the port "
                        "can use it (see wafer serve --tls-cert, --auth-token-file)", o.host)
        for rt in self.runtimes.values():
            rt.start()
        if self.options.realtime_streaming:
            # after the engine threads exist: they (and the compute threads they start) stay normal
            tids = [threading.get_native_id()] + grpc_threads()
            tids += [rt.publisher.native_id for rt in self.runtimes.values()]
            n = realtime_threads(tids)
            if n:
                log.info("%d streaming threads (event loop, publisher, gRPC's) run under SCHED_RR", n)

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every model is loaded and warmed; then health says SERVING. False (and
        still NOT_SERVING) when the server started draining first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for rt in self.runtimes.values():
            while not rt.loaded.is_set():
                if self.draining:
                    return False
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"model {rt.entry.name!r} not loaded within {timeout} s")
                await asyncio.sleep(0.05)
            if rt.error is not None:
                raise RuntimeError(f"model {rt.entry.name!r} failed to load: {rt.error}") from rt.error
        if self.draining:
            return False
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        for rt in self.runtimes.values():
            kv = rt.model.kv
            # the pool is reserved, not resident: its pages become resident as blocks are first
            # used (low block ids first, freed ones reused), so RSS grows with the most KV ever
            # held at once and stays there, up to this size (the registry's kv_blocks bounds it).
            # NumPy asks for transparent huge pages on large arrays, so it grows in steps: a 2 MiB
            # page per layer of K and of V (SmolLM2-135M: ~120 MiB per ~170 blocks of high water)
            log.info("model %s ready in %.1f s (%s; KV pool %d tokens, %.0f MiB, resident as used)%s",
                     rt.entry.name, rt.load_seconds, rt.config.quantization, rt.kv_tokens,
                     (kv.k.nbytes + kv.v.nbytes) / 2**20,
                     f", emulating {rt.emulate} on {rt.emulator.clock.n_wafers} wafer(s) with KV for "
                     f"{rt.emulator.clock.max_sequences} x {rt.emulator.clock.context} tokens, pace={rt.pace}"
                     if rt.emulator else "")
        log.info("ready: serving %s on %s", ", ".join(e.name for e in self.registry.served()),
                 self.address)
        return True

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting, let running streams finish within the grace period, then end them
        (each gets a final message with finish_reason "shutdown"), then stop the server. Called
        again while draining (a second Ctrl-C or SIGTERM), it ends the grace period at once."""
        if self.draining:
            if not self._hurry.is_set():
                log.info("draining: second signal, ending %d running stream(s) now",
                         self.servicer.active_streams)
                self._hurry.set()
            await self._stopped.wait()
            return
        grace = self.options.grace_s if grace_s is None else grace_s
        log.info("draining: no new requests; %.1f s grace for %d running stream(s)", grace,
                 self.servicer.active_streams)
        self.draining = True
        await self.health.enter_graceful_shutdown()
        scheds = [rt.scheduler for rt in self.runtimes.values() if rt.scheduler is not None]
        for s in scheds:
            s.stop_accepting()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not self._hurry.is_set():
            if all(s.idle() for s in scheds):
                break
            await asyncio.sleep(0.02)
        for s in scheds:
            s.finish_all(sch.FINISH_SHUTDOWN)
        # an engine ends its streams once its current model call returns (a prefill step can take
        # seconds on a busy machine); then the handlers send their final messages
        deadline = time.monotonic() + SHUTDOWN_FINALS_S
        while time.monotonic() < deadline and (
                self.servicer.active_streams or not all(s.idle() for s in scheds)):
            await asyncio.sleep(0.02)
        if self.servicer.active_streams:
            log.warning("draining: %d stream(s) got no final within %.0f s; cancelling them",
                        self.servicer.active_streams, SHUTDOWN_FINALS_S)
        await self.stop(grace=0.5)

    async def stop(self, grace: float | None = 0.0) -> None:
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace)
        for rt in self.runtimes.values():
            await asyncio.to_thread(rt.stop)
        if self.metrics is not None:
            self.metrics.close()
        self._stopped.set()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def serve(registry: Registry, options: ServerOptions, ready_file: str | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns a process exit code."""
    # The engine thread's short Python parts (sampling, stop checks) compete for the GIL with the
    # event loop streaming tokens; a shorter switch interval (default 5 ms) bounds how long the
    # engine can wait for it before its next decode.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server = WaferServer(registry, options)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s", signal.Signals(s).name),
                                                    asyncio.ensure_future(server.drain())))
    try:
        ready = await server.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        log.error("%s", e)
        await server.stop()
        return 1
    if ready and ready_file:
        with open(ready_file, "w") as f:
            f.write(f"{server.port} {server.metrics_port}\n")
    await server.wait_stopped()
    return 0
