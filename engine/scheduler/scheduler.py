"""The scheduler's public face: the thread-safe front other threads call (submit, cancel,
sessions, drain), the engine thread's ownership (start/stop/run) and loop, and the commands the
loop applies between steps. The model work of a step is
:class:`engine.scheduler.core.SchedulerCore`."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from engine.sampling import StreamPolicy
from engine.scheduler.admission import Overloaded, WaitEstimator
from engine.scheduler.commands import (Cancel, CloseSession, FinishAll, QueueFull,
                                       SchedulerClosed, Submit)
from engine.scheduler.core import NO_DEADLINE, SchedulerCore
from engine.scheduler.events import (FINISH_CANCELLED, FINISH_DEADLINE, FINISH_LENGTH,
                                     FINISH_SHUTDOWN, FINISH_STOP, FinishEvent, SeqStats,
                                     SessionExpired)
from engine.scheduler.sequence import Request, Sequence, Session
from engine.scheduler.sessions import turn_tokens
from engine.scheduler.speculate import Speculator

log = logging.getLogger(__name__)


class Scheduler(SchedulerCore):
    """Continuous batching for one model: a thread-safe front (submit, cancel, sessions, drain)
    and one engine thread that owns the model (:meth:`start` / :meth:`stop`, or :meth:`run` on a
    thread of the caller's; :meth:`apply_commands` + :meth:`step` drive it by hand).

    ``publish(items, quiet)`` receives the events (see the package docstring); ``on_step(batch,
    decode_ns, prefill_tokens)`` is called after every step; ``clock`` is the monotonic clock in
    ns the engine times its work and deadlines with.

    ``admission`` (engine.scheduler.admission) estimates a new request's queue wait from running
    sums and the engine's measured rates; ``submit`` refuses it (Overloaded) beyond
    ``cfg.max_queue_ms`` or its deadline."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.admission = WaitEstimator(self.cfg.max_batch, self.cfg.prefill_chunk, self.cfg.max_queue_ms)

    # ---------------------------------------------------------------- thread-safe front

    def submit(self, req: Request) -> None:
        """Queue a request; raise QueueFull beyond ``max_waiting``, Overloaded (a QueueFull) when
        its estimated queue wait exceeds ``max_queue_ms`` or its remaining deadline,
        SchedulerClosed when draining; ValueError for a token id outside the vocabulary."""
        if req.prompt and not 0 <= min(req.prompt) <= max(req.prompt) < self.vocab_size:
            bad = next(t for t in req.prompt if not 0 <= t < self.vocab_size)
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        adm = self.admission
        running = len(self.running)
        est = adm.estimate(self._inbox.pending_new, running)
        left = None if req.deadline_ns is None else (req.deadline_ns - self._now()) / 1e9
        why = adm.check(est, left)
        if why is not None:
            adm.refused += 1
            raise Overloaded(why, est)
        adm.charge(req, self._tokens_to_prefill(req))
        try:
            self._inbox.submit(req, self.cfg.max_batch - running)
        except BaseException:
            adm.uncharge(req)
            raise

    @staticmethod
    def _tokens_to_prefill(req: Request) -> int:
        """About how many tokens ``req``'s prefill computes (the engine knows exactly once it
        applies the submit: a session turn reuses its cached prefix)."""
        n = len(req.prompt)
        seq = req.session.seq if req.session is not None else None
        if req.replace and seq is not None:
            n -= seq.num_computed
        return max(1, n)

    def estimated_queue_wait(self):
        """What a request submitted now would be estimated to wait (an admission WaitEstimate)."""
        return self.admission.estimate(self._inbox.pending_new, len(self.running))

    def cancel(self, req: Request) -> None:
        self._inbox.put(Cancel(req))

    def open_session(self, idle_timeout_s: float | None = None, owner: Any = None) -> Session:
        with self._lock:
            if not self._inbox.accepting:
                raise SchedulerClosed("the server is shutting down and takes no new sessions")
            s = self.sessions.open(idle_timeout_s or self.cfg.session_idle_timeout_s, owner)
        if s is None:
            raise QueueFull(f"too many open sessions: limit max_sessions={self.cfg.max_sessions}")
        return s

    def close_session(self, session: Session, reason: str = "client") -> None:
        self._inbox.put(CloseSession(session, reason))

    def stop_accepting(self) -> None:
        with self._lock:
            self._inbox.accepting = False

    def finish_all(self, reason: str = FINISH_SHUTDOWN) -> None:
        """End every waiting and running request with ``reason`` (next step) and close sessions."""
        self._inbox.put(FinishAll(reason))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + self._inbox.pending_submits()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_prefilling(self) -> int:
        """Running sequences whose prefill is not complete."""
        return self._n_partial

    def kv_usage(self) -> float:
        return float(self.allocator.usage())

    def idle(self) -> bool:
        """Nothing running, waiting, or queued for the engine thread."""
        return not self.running and not self.waiting and not self._inbox

    # ---------------------------------------------------------------- the engine thread

    def start(self, name: str = "wafer-engine",
              on_thread: Callable[[], None] | None = None) -> threading.Thread | None:
        """Start the engine thread (a daemon named ``name``) running the loop until :meth:`stop`;
        ``on_thread`` runs first on that thread (per-thread settings: Numba's thread count,
        priority). Any thread. Returns the thread, or None after :meth:`stop` (a stopped
        scheduler stays stopped, so a stop racing a start wins); RuntimeError if the loop
        already runs."""
        with self._lock:
            self._claim_loop()
            if self._stop:
                return None

            def main() -> None:
                if on_thread is not None:
                    on_thread()
                self._loop()

            self._thread = threading.Thread(target=main, name=name, daemon=True)
            self._thread.start()
            return self._thread

    def run(self) -> None:
        """The engine loop on the calling thread, until :meth:`stop` (at once if stopped)."""
        with self._lock:
            self._claim_loop()
            self._thread = me = threading.current_thread()
        try:
            self._loop()
        finally:
            with self._lock:
                if self._thread is me:  # the caller's thread goes on; it no longer runs the loop
                    self._thread = None

    def _claim_loop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the scheduler's engine loop is already running")

    def stop(self, timeout: float | None = 10.0) -> bool:
        """End the engine loop after its current step and join the thread running it (the one
        :meth:`start` made, or the caller's in :meth:`run`). Any thread; idempotent. Requests
        still queued get no final (:meth:`finish_all` first for that). True once the loop has
        ended; False if it is still in a model call after ``timeout`` seconds."""
        with self._lock:
            self._stop = True
            thread = self._thread
        self._wake.set()
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _loop(self) -> None:
        while not self._stop:
            try:
                if self._inbox:
                    self.apply_commands()
                self._expire_sessions()
                if not self.running and not self.waiting:
                    self._flush()
                    self._wake.clear()
                    if not self._inbox:  # a submit after the clear sets the event again
                        self._wake.wait(0.05)
                    continue
                self.step()
            except Exception as e:  # never leave streams hanging on an engine error
                log.exception("engine step failed")
                self._fail_all(f"engine error: {e}")

    # ---------------------------------------------------------------- one step (engine thread)

    def step(self) -> None:
        """One step (engine thread): deadlines, one batched decode, prefill within the budget."""
        if self._now() >= self._next_deadline_ns:
            self._expire_deadlines()
        items: list = []
        batch = self._decode(items)
        if items:
            self.publish(items)
        items = []
        t_prefill = self._now()
        n_prefill = self._prefill(items, decoding=batch > 0)
        t_end = self._now()
        if items:
            self.publish(items)
        if batch == 0 and n_prefill == 0 and (self.waiting or self.running):
            self._unstick()
        adm = self.admission
        adm.prefilled(n_prefill)
        adm.observe(self._last_decode_ns, n_prefill, t_end - t_prefill,
                    self._last_decode_ns + t_end - t_prefill)
        if not self.waiting and not self._n_partial:
            adm.reset_engine()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(batch, self._last_decode_ns, n_prefill)
        if not self._has_model_work():  # no model call coming to flush before: flush now
            self._flush()

    def _has_model_work(self) -> bool:
        return bool(self.running) or bool(self.waiting and len(self.running) < self.cfg.max_batch)

    def _expire_deadlines(self) -> None:
        now = self._now()
        nxt = NO_DEADLINE
        for seq in list(self.running) + list(self.waiting):
            r = seq.req
            if r is None or r.deadline_ns is None:
                continue
            if now >= r.deadline_ns:
                self._finish(seq, FINISH_DEADLINE, None)
            else:
                nxt = min(nxt, r.deadline_ns)
        self._next_deadline_ns = nxt

    # ---------------------------------------------------------------- commands (engine thread)

    def apply_commands(self) -> None:
        """Apply what other threads queued (engine thread, between steps)."""
        inbox = self._inbox
        n_before = len(self._outbox)
        while inbox:
            cmd = inbox.pop()
            kind = type(cmd)
            if kind is Submit:
                req = cmd.req
                self._admit_request(req)
                seq = req.seq
                self.admission.settle(req, seq.n_tokens - seq.num_computed
                                      if seq is not None and seq.req is req else 0)
            elif kind is Cancel:
                req = cmd.req
                if not req.done and req.seq is not None:
                    self._finish(req.seq, FINISH_CANCELLED, None)
                elif not req.done:  # cancelled before it was admitted (still in the inbox order)
                    req.done = True
            elif kind is CloseSession:
                self._close_session(cmd.session, cmd.reason)
            elif kind is FinishAll:
                for seq in list(self.running) + list(self.waiting):
                    self._finish(seq, cmd.reason, None)
                for s in list(self.sessions.values()):
                    self._close_session(s, "shutdown")
        if len(self._outbox) > n_before:  # cancellations and refusals answer at once
            self._flush()

    _apply_commands = apply_commands  # the name benches/bench_engine.py drives it by

    # ---------------------------------------------------------------- admission's bookkeeping

    def _finish(self, seq: Sequence, reason: str, items: list, error: str | None = None) -> None:
        req = seq.req
        live = req is not None and not req.done
        if live and seq.prefilling:  # its unprefilled tokens leave the queue
            self.admission.dropped(seq.n_tokens - seq.num_computed)
        super()._finish(seq, reason, items, error)
        if live and reason in (FINISH_STOP, FINISH_LENGTH):
            self.admission.finished(seq.stats.completion_tokens)

    def _preempt(self, seq: Sequence) -> None:
        super()._preempt(seq)
        self.admission.requeued(seq.n_tokens - seq.num_computed)

    def _fail_all(self, message: str) -> None:
        super()._fail_all(message)
        self.admission.reset_engine()

    def _admit_request(self, req: Request) -> None:
        if req.done or (req.session is not None and req.session.closed):
            self._unqueue()
        if req.done:  # cancelled while in the inbox
            self.publish([(req, FinishEvent(FINISH_CANCELLED, SeqStats(arrival_ns=req.arrival_ns)))])
            return
        sess = req.session
        if sess is not None:
            if sess.closed:
                req.done = True
                self.publish([(req, FinishEvent(FINISH_CANCELLED, SeqStats(), error="session closed"))])
                return
            seq = sess.seq
            if seq is None:
                seq = sess.seq = Sequence(self.context_length, self.max_blocks)
            target, common = turn_tokens(seq, req)
            if len(target) > self.context_length:
                self._unqueue()
                req.done = True
                self.publish([(req, FinishEvent(FINISH_LENGTH, SeqStats(), error=(
                    f"conversation of {len(target)} tokens exceeds the model's context of "
                    f"{self.context_length}")))])
                return
            self.blocks.truncate(seq, min(common, len(target) - 1))  # the KV it keeps (cached)
            seq.set_tokens(target)
            sess.active = req
            sess.last_active = time.monotonic()
        else:
            seq = Sequence(self.context_length, self.max_blocks)
            seq.set_tokens(list(req.prompt))
        end = min(seq.n_tokens + req.params.max_tokens, self.context_length)
        seq.begin_turn(req, seq.num_computed, StreamPolicy(req.params, self.vocab_size,
                                                           self.tokenizer, self.eos_id, end))
        seq.spec = Speculator.for_params(req.params, self.cfg.num_speculative_tokens,
                                        self.model.numerics)
        if req.deadline_ns is not None:
            self._next_deadline_ns = min(self._next_deadline_ns, req.deadline_ns)
        self._enqueue(seq)

    def _close_session(self, sess: Session, reason: str) -> None:
        if sess.closed:
            return
        if sess.active is not None and not sess.active.done and sess.seq is not None:
            self._finish(sess.seq, FINISH_CANCELLED if reason == "client" else FINISH_SHUTDOWN, None)
        sess.closed = True
        sess.close_reason = reason
        if sess.seq is not None:
            self.blocks.free(sess.seq)
        self.sessions.pop(sess.session_id, None)
        if reason != "client" and sess.owner is not None:
            self.publish([(sess, SessionExpired(reason))])

    def _expire_sessions(self) -> None:
        for s in self.sessions.expired():
            log.info("session %s idle for %.0f s: expired", s.session_id,
                     time.monotonic() - s.last_active)
            self._close_session(s, "idle")
