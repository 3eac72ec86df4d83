"""The wafer gRPC server: model runtimes (one engine thread each), grpc.aio, health, reflection,
metrics, graceful drain.

    server = WaferServer(Registry.builtin(), ServerOptions(port=50051, metrics_port=9400))
    await server.start()          # binds, starts loading models (health NOT_SERVING)
    await server.wait_ready()     # models loaded and warmed (health SERVING)
    await server.drain()          # SIGTERM: stop taking work, let streams finish, then cancel
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engine import scheduler as sch
from engine.sampling import StopChecker
from engine.server.metrics import Metrics
from engine.server.registry import ModelEntry, Registry
from engine.server.servicer import SERVICE_NAME, Publisher, WaferServicer
from protos import wafer_pb2, wafer_pb2_grpc

log = logging.getLogger("wafer.server")

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
    engine_nice: int = 0              # niceness of the engine thread and the compute threads it starts
    engine_sched_idle: bool = False   # those threads under SCHED_IDLE instead (no privilege needed)
    realtime_streaming: bool = False  # the threads that stream tokens under SCHED_RR (needs privilege)


def lower_priority(nice: int) -> None:
    """Run this thread, and the Numba compute threads it starts (they inherit it), at a lower
    priority than the threads that stream tokens. The decode keeps both cores busy; without this
    a woken event loop can wait a scheduler time slice (measured: ITL spikes of 2-7 ms at p90 with
    one stream) before it sends a token that is already computed."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as e:
        log.warning("could not set the engine's niceness to %d: %s", nice, e)


def idle_priority() -> None:
    """Run this thread, and the Numba compute threads it starts (they inherit it), under
    SCHED_IDLE: the kernel lets any other woken thread - ours that stream tokens, a client on the
    same machine - preempt them at once, where at a low niceness a woken thread can still wait up
    to a scheduler tick (the p99 spikes of the serving bench). No privilege needed. The decode
    then only gets the cores nothing else wants: for a machine that serves and little else."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        log.info("engine and its compute threads run under SCHED_IDLE")
    except (OSError, AttributeError) as e:  # AttributeError: not Linux
        log.warning("cannot run the engine under SCHED_IDLE (%s); it keeps normal priority", e)


def realtime_threads(tids) -> int:
    """Put threads under SCHED_RR at the lowest real-time priority, so a woken thread takes a core
    from the compute threads at once instead of after up to a scheduler tick (the p99 spikes of
    the serving bench). Threads they start later are normal again (SCHED_RESET_ON_FORK). Needs
    CAP_SYS_NICE or an RLIMIT_RTPRIO of at least 1; returns how many threads were changed."""
    policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
    done = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(1))
            done += 1
        except ProcessLookupError:  # the thread has ended
            continue
        except OSError as e:
            log.warning("cannot run the streaming threads under SCHED_RR (%s): it needs CAP_SYS_NICE "
                        "or an RLIMIT_RTPRIO of at least 1; they keep normal priority", e)
            break
    return done


def grpc_threads() -> list[int]:
    """gRPC's threads in this process: core's I/O pollers and timers (by the names core gives them)
    and grpc.aio's completion-queue poller, a Python thread running ``_poll_wrapper``."""
    out = [t.native_id for t in threading.enumerate() if "_poll_wrapper" in t.name]
    for tid in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            continue
        if name.startswith(("event_engine", "grpc")):
            out.append(int(tid))
    return out


class ModelRuntime:
    """A loaded model and its scheduler, owned by one engine thread."""

    def __init__(self, entry: ModelEntry, options: ServerOptions, metrics: Metrics | None,
                 emulate: str = "", pace: str = "realtime"):
        self.entry = entry
        self.options = options
        self.metrics = metrics
        self.emulate = emulate
        self.pace = pace
        self.model = None
        self.scheduler: sch.Scheduler | None = None
        self.emulator = None
        self.publisher = None
        self._on_step = None
        self.error: BaseException | None = None
        self.loaded = threading.Event()
        self._stopping = False  # set by stop(); a model still loading then never starts serving
        self.load_seconds = 0.0
        self._thread: threading.Thread | None = None

    @property
    def is_ready(self) -> bool:
        return self.loaded.is_set() and self.error is None

    @property
    def config(self):
        return self.model.config

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def detokenizer(self, params):
        """Text deltas for a stream's token ids (stop strings held back and cut, as the engine
        decides them)."""
        return StopChecker(params, self.model.tokenizer, self.model.tokenizer.eos_id)

    @property
    def kv_tokens(self) -> int:
        return self.model.kv.num_blocks * self.model.kv.block_size

    def start(self) -> None:
        # the publisher thread is started here, not on the engine thread: a thread inherits its
        # creator's niceness, and the hand-off to the event loop must not wait behind the decode
        self._on_step = self.metrics.step_observer(self.entry.name) if self.metrics else None
        self.publisher = Publisher(after_hop=self._on_step.drain if self._on_step else None)
        self._thread = threading.Thread(target=self._main, name=f"wafer-engine-{self.entry.name}",
                                        daemon=True)
        self._thread.start()

    def _main(self) -> None:
        """Engine thread: load + warm the model, then run the batching loop until stopped."""
        if self.options.engine_sched_idle:
            idle_priority()
        elif self.options.engine_nice:
            lower_priority(self.options.engine_nice)
        try:
            from engine.fetch import resolve_model
            from engine.model import Model

            t0 = time.perf_counter()
            e = self.entry
            model = Model.load(resolve_model(e.path), max_batch=e.max_batch, kv_blocks=e.kv_blocks,
                               block_size=e.block_size, threads=self.options.threads)
            model.warmup()
            if self.emulate:
                from engine.server.emulation import Emulator

                pool = model.kv.num_blocks * model.kv.block_size
                self.emulator = Emulator(self.emulate, self.pace, kv_tokens=pool)
            cfg = sch.SchedulerConfig(
                max_batch=e.max_batch, max_waiting=e.max_waiting, prefill_chunk=e.prefill_chunk,
                session_idle_timeout_s=self.options.session_idle_timeout_s)
            self.scheduler = sch.Scheduler(model, cfg, publish=self.publisher, on_step=self._on_step)
            self.model = model
            if self.metrics:
                self.metrics.bind_scheduler(e.name, self.scheduler)
            # Loading leaves ~120k long-lived objects (vocabulary, GGUF metadata, Numba's types). A
            # full collection walks them all (~50 ms here) holding the GIL, stalling every stream;
            # freezing them keeps later collections to the objects serving creates.
            gc.collect()
            gc.freeze()
            self.load_seconds = time.perf_counter() - t0
        except BaseException as exc:  # reported by wait_ready
            log.exception("loading model %r failed", self.entry.name)
            self.error = exc
            self.loaded.set()
            return
        self.loaded.set()
        if not self._stopping:
            self.scheduler.run()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread. One still loading the model is not waited for (loading cannot
        be interrupted; the thread is a daemon and never starts serving)."""
        self._stopping = True
        if self.scheduler is not None:
            self.scheduler._stop = True
            self.scheduler._wake.set()
        if self._thread is not None and self.scheduler is not None:
            self._thread.join(timeout)
        if self.publisher is not None:
            self.publisher.close()


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

    async def start(self) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        wafer_pb2_grpc.add_WaferServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            wafer_pb2.DESCRIPTOR.services_by_name["Wafer"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        for svc in ("", SERVICE_NAME):
            await self.health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        where = f"{self.options.host}:{self.options.port}"
        try:
            self.port = server.add_insecure_port(where)
        except RuntimeError as e:  # grpcio raises this when the address is taken
            raise OSError(f"cannot bind the gRPC port {where} (in use?): {e}") from None
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {where}")
        await server.start()
        self.grpc_server = server
        if self.metrics is not None:
            try:
                self.metrics_port = self.metrics.serve(self.options.metrics_port, self.options.host)
            except OSError as e:
                await server.stop(0)
                raise OSError(f"cannot bind the metrics port {self.options.host}:{self.options.metrics_port}: "
                              f"{e.strerror or e}") from None
        log.info("listening on %s (metrics %s); loading %d model(s)", self.address,
                 f"http://{self.options.host}:{self.metrics_port}/metrics" if self.metrics else "off",
                 len(self.runtimes))
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
            log.info("model %s ready in %.1f s (%s)%s", rt.entry.name, rt.load_seconds,
                     rt.config.quantization,
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
            busy = any(s.running or s.waiting or s._inbox for s in scheds)
            if not busy:
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
