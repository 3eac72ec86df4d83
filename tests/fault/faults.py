"""Helpers of the fault suite (tests/fault): a hostile client's calls and the server's invariants.

``assert_invariants(server, baseline)`` is what every scenario ends with: KV blocks back to the
baseline, nothing running, waiting or queued for prefill, no stream left open, no extra thread,
the server loop's asyncio tasks back to the baseline, health SERVING, and (with a ``Ledger``) every
request counted exactly once, as finished (by reason) or failed (by status code).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc
from serving import scrape as scrape_url

MODELS = ("tiny", "tiny-narrow", "tiny-q")  # the fault server's engines (see conftest.py)
# threads that pools keep between calls (the loop's default executor, grpc's): allowed to stay
POOL_THREAD_PREFIXES = ("ThreadPoolExecutor", "asyncio_", "grpc", "fault-client-loop")


_client_loop: asyncio.AbstractEventLoop | None = None


def run(coro, timeout: float = 60.0):
    """Run a client coroutine on the suite's one client event loop (a thread of its own, kept for
    the whole run: grpc.aio's poller outlives a loop that asyncio.run would close under it)."""
    global _client_loop
    if _client_loop is None:
        _client_loop = asyncio.new_event_loop()
        threading.Thread(target=_client_loop.run_forever, name="fault-client-loop", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), _client_loop).result(timeout + 5)


async def until(pred, timeout=10.0, every=0.005) -> bool:
    """``wait_until`` for a coroutine: polls without blocking the client loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(every)
    return pred()


def wait_until(pred, timeout=15.0, every=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


# ------------------------------------------------------------------------- the server's state


def scrape(server) -> dict[str, float]:
    return scrape_url(server.metrics_url)


def outcomes(server, model: str) -> dict[str, float]:
    """The model's requests counted so far: finished by reason and failed by status code."""
    out = {}
    for key, v in scrape(server).items():
        if f'model_name="{model}"' not in key:
            continue
        if key.startswith("wafer_request_success_total{"):
            out["finished:" + key.split('finished_reason="')[1].split('"')[0]] = v
        elif key.startswith("wafer_request_errors_total{"):
            out["failed:" + key.split('code="')[1].split('"')[0]] = v
    return out


@dataclass
class Ledger:
    """Counts requests as a scenario sends them; ``settle`` then checks that the server counted
    each exactly once (finished or failed-with-code), no more, no fewer."""

    server: object
    before: dict = field(default_factory=dict)
    sent: dict = field(default_factory=dict)  # model -> requests the server must count
    maybe: dict = field(default_factory=dict)  # model -> of those, how many may never arrive

    def __post_init__(self):
        self.before = {m: outcomes(self.server, m) for m in MODELS}

    def add(self, model: str, n: int = 1, maybe: int = 0) -> None:
        """``n`` requests sent; ``maybe`` of them may never reach the server (a deadline of a
        few ms can pass in the client before the call is sent)."""
        self.sent[model] = self.sent.get(model, 0) + n
        self.maybe[model] = self.maybe.get(model, 0) + maybe

    def delta(self, model: str) -> dict[str, float]:
        now = outcomes(self.server, model)
        return {k: v - self.before[model].get(k, 0) for k, v in now.items()
                if v - self.before[model].get(k, 0)}

    def settle(self, timeout: float = 15.0) -> dict[str, dict[str, float]]:
        out = {}
        for m in MODELS:
            want, maybe = self.sent.get(m, 0), self.maybe.get(m, 0)
            wait_until(lambda: sum(self.delta(m).values()) >= want, timeout if not maybe else 1.0)
            time.sleep(0.05)  # a request counted twice would show now
            d = self.delta(m)
            assert want - maybe <= sum(d.values()) <= want, f"{m}: {want} requests sent, counted {d}"
            out[m] = d
        return out


@dataclass
class Baseline:
    threads: set
    tasks: int
    kv: dict


def server_tasks(server) -> int:
    async def count():
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])
    return server.call(count(), 10)


def take_baseline(server, models=MODELS) -> Baseline:
    """The state to come back to; ``models``: the server's model names (default: the fault
    server's), the ones ``assert_invariants`` then checks."""
    return Baseline(set(threading.enumerate()), server_tasks(server),
                    {m: server.runtime(m).scheduler.allocator.num_used for m in models})


def extra_threads(baseline: Baseline) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in baseline.threads and t.is_alive()
            and not t.name.startswith(POOL_THREAD_PREFIXES)]


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="wafer.v1.Wafer"), timeout=10).status


def assert_invariants(server, baseline: Baseline, ledger: Ledger | None = None) -> dict:
    """The server is back where it was: see the module docstring. Returns the ledger's counts."""
    for m in baseline.kv:
        s = server.runtime(m).scheduler
        assert wait_until(lambda: s.idle() and s.num_waiting == 0 and s.num_running == 0), \
            f"{m}: {s.num_running} running, {s.num_waiting} waiting"
        assert wait_until(lambda: s.allocator.num_used == baseline.kv[m]), \
            f"{m}: {s.allocator.num_used} KV blocks used, baseline {baseline.kv[m]}"
        assert s.admission.tokens_ahead == 0, f"{m}: {s.admission.tokens_ahead} tokens still queued"
        assert not [x for x in s.sessions.values() if not x.closed], f"{m}: sessions left open"
    assert wait_until(lambda: server.server.servicer.active_streams == 0), "streams left open"
    assert wait_until(lambda: not extra_threads(baseline)), f"threads left: {extra_threads(baseline)}"
    assert wait_until(lambda: server_tasks(server) <= baseline.tasks), \
        f"{server_tasks(server)} asyncio tasks on the server loop, baseline {baseline.tasks}"
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
    return ledger.settle() if ledger is not None else {}


# ------------------------------------------------------------------------- fault injection


@contextlib.contextmanager
def slow_engine(server, model: str, prefill_s: float = 0.0, decode_s: float = 0.0):
    """Make a model's prefill and/or decode calls take at least this long (the engine thread
    sleeps after each): a tiny model that behaves like a big one under load."""
    m = server.runtime(model).model
    prefill, decode = m.prefill, m.decode

    def slow_prefill(*a, **kw):
        out = prefill(*a, **kw)
        time.sleep(prefill_s)
        return out

    def slow_decode(*a, **kw):
        out = decode(*a, **kw)
        time.sleep(decode_s)
        return out

    if prefill_s:
        m.prefill = slow_prefill
    if decode_s:
        m.decode = slow_decode
    try:
        yield
    finally:
        m.__dict__.pop("prefill", None)
        m.__dict__.pop("decode", None)


# ------------------------------------------------------------------------- a client's calls


def gen_request(model="tiny", prompt_tokens=8, max_tokens=16, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=[(7 * i) % 300 + 1 for i in range(prompt_tokens)]),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0), **kw)


@dataclass
class Outcome:
    """How a call ended for its client: a Final (``reason``), a status (``code``), or cancelled
    by the client itself (``code`` CANCELLED, ``by_client``)."""

    tokens: int = 0
    reason: str = ""
    code: grpc.StatusCode | None = None
    details: str = ""
    by_client: bool = False

    @property
    def ended(self) -> bool:
        return bool(self.reason) or self.code is not None


async def generate(stub, req, *, timeout=30.0, cancel_after: int | None = None,
                   read_delay: float = 0.0, on_token=None) -> Outcome:
    """One Generate call read to its end; ``cancel_after`` tokens the client cancels it (0: at
    once, before any response). Asserts the stream's shape: chunks, then exactly one final last."""
    out = Outcome()
    call = stub.Generate(req, timeout=timeout)
    try:
        if cancel_after == 0:
            await asyncio.sleep(0)
            call.cancel()
            out.by_client, out.code = True, grpc.StatusCode.CANCELLED
            return out
        async for msg in call:
            assert not out.reason, "a message after the final"
            if msg.HasField("final"):
                out.reason = msg.final.finish_reason
                continue
            out.tokens += len(msg.chunk.token_ids)
            if on_token is not None:
                on_token(out)
            if cancel_after is not None and out.tokens >= cancel_after:
                call.cancel()
                out.by_client, out.code = True, grpc.StatusCode.CANCELLED
                return out
            if read_delay:
                await asyncio.sleep(read_delay)
    except grpc.aio.AioRpcError as e:
        out.code, out.details = e.code(), e.details() or ""
    except asyncio.CancelledError:
        out.by_client, out.code = True, grpc.StatusCode.CANCELLED
    assert out.ended, "the stream ended with neither a final nor a status"
    return out


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def stub_of(ch) -> pb_grpc.WaferStub:
    return pb_grpc.WaferStub(ch)
