"""Prometheus metrics, vLLM-style names with a ``wafer_`` prefix, served on their own port.

Each server owns a private ``CollectorRegistry`` (several servers can live in one process, as in
the tests). Histogram buckets follow vLLM's for latencies in seconds. The endpoint can be HTTPS
(``tls``: an ssl.SSLContext, handshakes on the request's thread, so a client that never sends one
holds no one else up) and ask for a bearer token (``tokens``: engine.server.security).
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               make_wsgi_app)
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                40.0, 50.0, 60.0, 120.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)


class StepRecorder:
    """The engine thread only appends each step's numbers; ``drain`` (called by the publisher
    thread after each hand-off) puts them in the histograms, off the engine's critical path."""

    def __init__(self, batch_size, step_time):
        self._batch_size = batch_size
        self._step_time = step_time
        self._pending: collections.deque = collections.deque(maxlen=65536)

    def __call__(self, batch_size: int, decode_ns: int, prefill_tokens: int) -> None:
        if batch_size:
            self._pending.append((batch_size, decode_ns))

    def drain(self) -> None:
        while self._pending:
            batch_size, decode_ns = self._pending.popleft()
            self._batch_size.observe(batch_size)
            self._step_time.observe(decode_ns / 1e9)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - no line per scrape
        pass


class _MetricsHTTPServer(ThreadingWSGIServer):
    """prometheus_client's threading WSGI server; with ``ssl_context``, each connection's TLS
    handshake runs on its own thread (with a timeout), not in the accept loop."""

    ssl_context: ssl.SSLContext | None = None
    HANDSHAKE_TIMEOUT_S = 10.0

    def finish_request(self, request, client_address):
        if self.ssl_context is None:
            return super().finish_request(request, client_address)
        request.settimeout(self.HANDSHAKE_TIMEOUT_S)
        with self.ssl_context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request, client_address):  # a failed handshake, a client gone
        log.debug("metrics endpoint: request from %s failed", client_address, exc_info=True)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds
        L = ["model_name"]
        self.ttft = Histogram("wafer_time_to_first_token_seconds",
                              "Time from request arrival to its first token sent.", L,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("wafer_inter_token_latency_seconds",
                             "Time between consecutive tokens sent on one stream.", L,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("wafer_e2e_request_latency_seconds",
                             "Time from request arrival to its final message.", L,
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue = Histogram("wafer_request_queue_time_seconds",
                               "Time a request waited before it was first scheduled.", L,
                               buckets=_TTFT_BUCKETS, registry=r)
        self.prefill_time = Histogram("wafer_request_prefill_time_seconds",
                                      "Engine time spent prefilling a request.", L,
                                      buckets=_TTFT_BUCKETS, registry=r)
        self.step_time = Histogram("wafer_engine_step_seconds",
                                   "Engine time of one batched decode step.", L,
                                   buckets=_ITL_BUCKETS, registry=r)
        self.batch_size = Histogram("wafer_batch_size",
                                    "Sequences advanced by one decode step.", L,
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("wafer_prompt_tokens",
                                     "Prompt tokens of finished requests.", L, registry=r)
        self.generation_tokens = Counter("wafer_generation_tokens",
                                         "Tokens generated.", L, registry=r)
        self.cached_tokens = Counter("wafer_prefix_cache_hit_tokens",
                                     "Prompt tokens served from the KV cache (a session's or the "
                                     "prefix cache).", L, registry=r)
        # vLLM's prefix_cache_queries / prefix_cache_hits, in tokens: hit rate = hits / queries
        self.prefix_queries = Counter("wafer_prefix_cache_queries",
                                      "Prompt tokens of finished requests looked up in the KV "
                                      "cache.", L, registry=r)
        self.prefix_hits = Counter("wafer_prefix_cache_hits",
                                   "Prompt tokens of finished requests whose KV came from the "
                                   "cache (prefix cache or session).", L, registry=r)
        self.prefix_blocks = Gauge("wafer_prefix_cache_blocks",
                                   "KV blocks holding a cached prefix (in use or evictable).", L,
                                   registry=r)
        self.request_success = Counter("wafer_request_success",
                                       "Finished requests by finish reason.",
                                       L + ["finished_reason"], registry=r)
        self.request_errors = Counter("wafer_request_errors",
                                      "Requests refused or failed, by gRPC status code.",
                                      L + ["code"], registry=r)
        self.preemptions = Counter("wafer_num_preemptions",
                                   "Sequences preempted (KV freed, recomputed later).", L, registry=r)
        self.running = Gauge("wafer_num_requests_running",
                             "Requests in the running batch.", L, registry=r)
        self.waiting = Gauge("wafer_num_requests_waiting",
                             "Requests waiting to be scheduled.", L, registry=r)
        self.kv_usage = Gauge("wafer_kv_cache_usage_perc",
                              "Fraction of KV-cache blocks in use (0..1).", L, registry=r)
        self.sessions = Gauge("wafer_num_sessions", "Open persistent sessions.", L, registry=r)
        self.emulation_lateness = Histogram("wafer_emulation_token_lateness_seconds",
                                            "How late each token left vs the simulated wafer schedule.",
                                            L, buckets=_ITL_BUCKETS, registry=r)
        # speculative decoding, as vLLM's spec_decode_* (counted when a request finishes)
        self.spec_drafts = Counter("wafer_spec_decode_num_drafts",
                                   "Decode steps that verified draft tokens.", L, registry=r)
        self.spec_draft_tokens = Counter("wafer_spec_decode_num_draft_tokens",
                                         "Draft tokens verified.", L, registry=r)
        self.spec_accepted_tokens = Counter("wafer_spec_decode_num_accepted_tokens",
                                            "Draft tokens accepted.", L, registry=r)
        self.spec_accepted_per_pos = Counter("wafer_spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted, by position in the draft "
                                             "(0 = first).", L + ["position"], registry=r)
        self.spec_acceptance_rate = Gauge("wafer_spec_decode_acceptance_rate",
                                          "Accepted / verified draft tokens, since start.", L,
                                          registry=r)
        self.spec_mean_accepted_length = Gauge("wafer_spec_decode_mean_accepted_length",
                                               "Tokens per verify step (1 + accepted drafts), "
                                               "since start.", L, registry=r)
        self._spec_totals: dict = {}  # model -> [steps, drafts, accepted]
        self._http = None

    def record_speculation(self, model_name: str, st) -> None:
        """A finished request's speculation counts (engine.scheduler.SeqStats)."""
        self.spec_drafts.labels(model_name).inc(st.spec_steps)
        self.spec_draft_tokens.labels(model_name).inc(st.spec_draft_tokens)
        self.spec_accepted_tokens.labels(model_name).inc(st.spec_accepted_tokens)
        for pos, n in enumerate(st.spec_accepted_per_pos):
            if n:
                self.spec_accepted_per_pos.labels(model_name, str(pos)).inc(n)
        t = self._spec_totals.setdefault(model_name, [0, 0, 0])
        t[0] += st.spec_steps
        t[1] += st.spec_draft_tokens
        t[2] += st.spec_accepted_tokens
        if t[1]:
            self.spec_acceptance_rate.labels(model_name).set(t[2] / t[1])
        if t[0]:
            self.spec_mean_accepted_length.labels(model_name).set(1.0 + t[2] / t[0])

    def bind_scheduler(self, model_name: str, scheduler) -> None:
        """Gauges read live from a scheduler (its counters are plain ints, safe to read)."""
        self.running.labels(model_name).set_function(lambda: scheduler.num_running)
        self.waiting.labels(model_name).set_function(lambda: scheduler.num_waiting)
        self.kv_usage.labels(model_name).set_function(scheduler.kv_usage)
        self.sessions.labels(model_name).set_function(lambda: len(scheduler.sessions))
        self.prefix_blocks.labels(model_name).set_function(lambda: scheduler.allocator.num_cached)

    def step_observer(self, model_name: str) -> "StepRecorder":
        """A Scheduler ``on_step`` hook recording batch size and step time."""
        return StepRecorder(self.batch_size.labels(model_name), self.step_time.labels(model_name))

    def serve(self, port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None,
              tokens: tuple[bytes, ...] = ()) -> int:
        """Start the /metrics HTTP(S) endpoint; return the bound port (``port=0`` picks one)."""
        from engine.server.security import metrics_app

        app = make_wsgi_app(self.registry)
        if tokens:
            app = metrics_app(app, tokens)

        class Server(_MetricsHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            ssl_context = tls

        server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="wafer-metrics", daemon=True).start()
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
