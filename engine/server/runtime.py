"""A served model: loaded and warmed on a loading thread, then driven by its scheduler's engine
thread (``Scheduler.start`` / ``Scheduler.stop``), with the publisher that hands its tokens to
the event loop.

    rt = ModelRuntime(entry, options, metrics, emulate, pace)
    rt.start()      # returns at once; rt.loaded is set when the model is ready (or failed)
    rt.stop()       # stops the engine thread; a model still loading never starts serving
"""

from __future__ import annotations

import gc
import logging
import threading
import time

from engine import scheduler as sch
from engine.sampling import StopChecker
from engine.server.metrics import Metrics
from engine.server.options import ServerOptions
from engine.server.publisher import Publisher
from engine.server.registry import ModelEntry
from engine.server.threads import idle_priority, lower_priority

log = logging.getLogger("wafer.server")



class ModelRuntime:
    """A loaded model and its scheduler, whose engine thread calls every model kernel."""

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
        self.publisher: Publisher | None = None
        self.error: BaseException | None = None
        self.loaded = threading.Event()
        self.load_seconds = 0.0
        self.engine_thread: threading.Thread | None = None  # None until serving (never, if stopped first)
        self._on_step = None
        self._loader: threading.Thread | None = None
        self._lock = threading.Lock()  # orders stop() against the loader starting the engine
        self._stopping = False
        self._serving = False  # the scheduler's engine thread was started

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
        # the publisher thread is started here, not on the loading thread: a thread inherits its
        # creator's niceness, and the hand-off to the event loop must not wait behind the decode
        self._on_step = self.metrics.step_observer(self.entry.name) if self.metrics else None
        self.publisher = Publisher(after_hop=self._on_step.drain if self._on_step else None)
        self._loader = threading.Thread(target=self._load, name=f"wafer-load-{self.entry.name}",
                                        daemon=True)
        self._loader.start()

    def _load(self) -> None:
        """Loading thread: lower its priority (the engine thread and the compute threads started
        from here inherit it), load + warm the model, then start the engine thread."""
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
                               block_size=e.block_size, threads=self.options.threads,
                               numerics=e.numerics or self.options.numerics)
            model.warmup()
            if self.emulate:
                from engine.server.emulation import Emulator

                self.emulator = Emulator(self.emulate, self.pace, kv_tokens=model.kv.num_blocks
                                         * model.kv.block_size)
            cfg = sch.SchedulerConfig(
                max_batch=e.max_batch, max_waiting=e.max_waiting, prefill_chunk=e.prefill_chunk,
                max_queue_ms=e.max_queue_ms,
                prefix_caching=e.prefix_caching and self.options.prefix_caching,
                session_idle_timeout_s=self.options.session_idle_timeout_s,
                num_speculative_tokens=self.options.speculate)
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
        with self._lock:
            if not self._stopping:
                self.engine_thread = self._start_engine()
                self._serving = True
        self.loaded.set()

    def _start_engine(self) -> threading.Thread | None:
        """The engine thread, through ``Scheduler.start``. Numba's thread count is a per-thread
        setting (a new thread starts at the default), so it is set again on the engine thread,
        which inherits this (loading) thread's priority."""
        threads = self.options.threads

        def on_engine_thread() -> None:
            if threads:
                import numba

                numba.set_num_threads(threads)

        return self.scheduler.start(name=f"wafer-engine-{self.entry.name}", on_thread=on_engine_thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread. One still loading the model is not waited for (loading cannot
        be interrupted; the thread is a daemon and never starts serving)."""
        with self._lock:
            self._stopping = True
            serving = self._serving
        if serving:
            self.scheduler.stop(timeout)
        if self.publisher is not None:
            self.publisher.close()
