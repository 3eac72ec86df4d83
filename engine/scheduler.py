"""Continuous batching over the paged KV cache (nano-vllm style).

One engine thread owns the model and runs :meth:`Scheduler.step` in a loop. Two queues:
``waiting`` (admitted but not yet prefilled, FIFO) and ``running`` (have KV blocks). Each step:

1. apply commands that other threads queued (submit, cancel, session turns/close);
2. drop sequences whose deadline passed;
3. **decode** every running sequence that has a sampled token not yet in the cache, in one batched
   ``model.decode`` call (allocating a block when a sequence crosses a block boundary; when the
   pool is dry the newest running sequence is preempted: its blocks are freed and it is recomputed
   later from its tokens, so no sequence ever writes into another's blocks);
4. **prefill** within a token budget: first continue chunked prefills, then admit waiting
   sequences in FIFO order while the batch has room and blocks are free. The budget is small while
   other sequences are decoding (their streams keep flowing) and large when nothing is decoding.
   Only the first prefill of a step is cut to the budget; a later one that does not fit waits for
   the next step, so a short prompt never pays an extra decode step in the middle of its prefill.

Tokens leave through ``publish(items, quiet)`` with a list of ``(request, event)`` pairs, handed
over right before the next model call; a decode step is one ``(None, DecodeStep)`` item for its
whole batch, which :func:`iter_events` expands on the consumer's side; ``quiet`` says that at most
one sequence is decoding. The server turns each list into one hop into its event loop. The
scheduler knows nothing of gRPC.

Everything the engine thread does between two model calls delays every stream (and runs with
caches the step just flushed), so it does only what the next step needs: the sampled ids and the
finish decision. Events carry token ids; the consumer makes the text (``engine.sampling.StopChecker``
on its side). Only a request with stop strings is detokenized here too, to know when to stop.

Sessions keep their :class:`Sequence` (tokens + blocks) between turns; a new turn prefills only
the tokens after the longest prefix it shares with what is already in the cache.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.kv_cache import OutOfBlocks
from engine.sampling import Sampler, StopChecker, logprobs_topn

log = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_DEADLINE = "deadline"
FINISH_SHUTDOWN = "shutdown"
FINISH_ERROR = "error"

NO_DEADLINE = 1 << 62
SESSION_EXPIRY_CHECK_S = 0.05


class QueueFull(Exception):
    """The bounded waiting queue is full (maps to RESOURCE_EXHAUSTED)."""


class SchedulerClosed(Exception):
    """The scheduler is draining or stopped and takes no new work (maps to UNAVAILABLE)."""


ATTENTION_COST_FACTOR = 3.0  # prefill attention's cost per flop against the weights' matmuls
                             # (SmolLM2-135M, 2 cores: a 6500-token prompt took 72.7 s, ~3.4x)


@dataclass
class SchedulerConfig:
    max_batch: int = 64               # sequences per decode step (<= the model's max_batch)
    max_waiting: int = 256            # bounded admission queue; beyond it QueueFull
    prefill_chunk: int = 64           # prefill tokens per step while others decode
    prefill_budget_idle: int = 512    # prefill tokens per step while nothing decodes (a burst of
                                      # prompts: until the first of them has its first token); it
                                      # bounds a step, between which cancels and deadlines act
                                      # (512 prompt tokens take ~1.5 s on 2 cores at the start of
                                      # a prompt; fewer deeper in, see _chunk_at; prefill is
                                      # compute-bound well below 512, so bigger gains nothing)
    session_idle_timeout_s: float = 300.0
    max_sessions: int = 256


# ------------------------------------------------------------------------------------ events


@dataclass(slots=True)
class TokenEvent:
    token_id: int
    step_ns: int          # engine compute since this sequence's previous token (decode + the prefill
                          # interleaved before it); for the first token, the request's prefill time
    batch_size: int       # sequences in that decode step (1 for a token from prefill)
    t_ns: int             # monotonic time the engine produced it
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    in_flight: int = 0    # sequences holding KV when it was made (0 = batch_size; for the wafer clock)


@dataclass(slots=True)
class SeqStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    prefill_ns: int = 0       # engine time spent in this request's prefill calls
    queue_ns: int = 0         # from submit() to the start of its prefill (waiting for the engine)
    max_batch_size: int = 0
    preemptions: int = 0
    arrival_ns: int = 0
    first_token_ns: int = 0
    finish_ns: int = 0


@dataclass(slots=True)
class DecodeStep:
    """The tokens of one decode step for its whole batch, published as one item ``(None, step)``
    so the engine thread creates no per-sequence objects; :func:`iter_events` expands it into
    each request's TokenEvent on the consumer's thread."""

    reqs: list            # the batch's requests, in row order
    tokens: list[int]     # the token each row sampled
    step_ns: int          # the decode plus the prefill work since the previous decode
    batch_size: int
    t_ns: int
    logprobs: dict | None  # row -> (logprob, top) for the rows that asked for them
    # requests whose previous token came from a prefill after the previous decode -> the prefill
    # work up to and including it (not part of their time since that token); None if none
    joined: dict | None = None


def iter_events(items):
    """The ``(request, event)`` pairs of a published list, decode steps expanded."""
    for req, ev in items:
        if req is not None:
            yield req, ev
            continue
        lps = ev.logprobs
        joined = ev.joined
        for i, (r, tok) in enumerate(zip(ev.reqs, ev.tokens)):
            lp, top = lps[i] if lps and i in lps else (None, None)
            step_ns = ev.step_ns - joined[r] if joined and r in joined else ev.step_ns
            yield r, TokenEvent(tok, step_ns, ev.batch_size, ev.t_ns, lp, top)


@dataclass(slots=True)
class FinishEvent:
    reason: str
    stats: SeqStats
    error: str | None = None


@dataclass(slots=True)
class SessionExpired:
    """Published to a session's ``on_close`` owner when it expires or the server shuts down."""

    reason: str


# ------------------------------------------------------------------------------------ requests


@dataclass(eq=False)
class Request:
    """One generation (a Generate call or one session turn).

    ``prompt`` is the full token list the generation continues from. For a session turn with
    ``replace=False`` the prompt is appended to the session's tokens; with ``replace=True`` it is
    the whole conversation and the session's cache is reused up to the common prefix.
    """

    prompt: list[int]
    params: Any                              # engine.sampling.SamplingParams
    request_id: str = ""
    deadline_ns: int | None = None           # monotonic deadline
    session: "Session | None" = None
    replace: bool = False
    owner: Any = None                        # opaque, for the publisher (e.g. an asyncio queue)
    on_event: Callable[[Any], None] | None = None  # used by the default publisher
    arrival_ns: int = field(default_factory=time.monotonic_ns)  # when the server got the call
    submitted_ns: int = 0                    # set by submit()
    # filled by the scheduler
    seq: "Sequence | None" = None
    done: bool = False

    def __repr__(self) -> str:
        return (f"Request(id={self.request_id!r}, prompt={len(self.prompt)} tokens, "
                f"session={self.session.session_id if self.session else None}, done={self.done})")


class Session:
    """A persistent sequence owned by one client stream."""

    _ids = itertools.count(1)

    def __init__(self, idle_timeout_s: float, owner: Any = None):
        self.session_id = f"s{next(self._ids)}"
        self.idle_timeout_s = idle_timeout_s
        self.owner = owner
        self.seq: Sequence | None = None     # created with the first turn
        self.active: Request | None = None
        self.last_active = time.monotonic()
        self.closed = False
        self.close_reason = ""

    @property
    def tokens(self) -> list[int]:
        return [] if self.seq is None else self.seq.token_list()


class Sequence:
    """Tokens of one sequence, how many of them are in the KV cache, and its blocks."""

    # slots: the per-row work between two decode calls runs with caches the model call has just
    # flushed, and a slot read misses less than an instance-dict lookup
    __slots__ = ("seq_id", "tokens", "n_tokens", "num_computed", "blocks", "table", "req",
                 "prompt_len", "end", "max_batch", "sampler", "greedy", "stop_ids", "n_logprobs",
                 "stopper", "prefilling", "stats", "scheduled", "row")
    _ids = itertools.count(1)

    def __init__(self, capacity: int, max_blocks: int):
        self.seq_id = next(self._ids)
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.n_tokens = 0
        self.num_computed = 0
        self.blocks: list[int] = []
        self.table = np.zeros(max_blocks, dtype=np.int32)
        self.req: Request | None = None
        # per-turn state
        self.prompt_len = 0
        self.end = 0                         # n_tokens at which the turn ends by length
        self.max_batch = 0                   # the largest decode batch it was part of
        self.sampler = None
        self.greedy = False                  # plain argmax: the model's own pick is the token
        self.stop_ids: frozenset = frozenset()
        self.n_logprobs = 0
        self.stopper = None                  # a StopChecker, only when the request has stop strings
        self.prefilling = True
        self.stats = SeqStats()
        self.scheduled = False
        self.row = -1                        # its row in the decode batch, -1 when not in it

    def token_list(self) -> list[int]:
        return self.tokens[: self.n_tokens].tolist()

    def set_tokens(self, ids: list[int]) -> None:
        self.tokens[: len(ids)] = ids
        self.n_tokens = len(ids)

    def append(self, tok: int) -> None:
        self.tokens[self.n_tokens] = tok
        self.n_tokens += 1


# ------------------------------------------------------------------------------------ scheduler


def _default_publish(items, quiet: bool = False) -> None:
    for req, ev in iter_events(items):
        if req.on_event is not None:
            req.on_event(ev)


class Scheduler:
    """Continuous batching for one model. Thread-safe front (submit/cancel/...), one engine thread."""

    def __init__(
        self,
        model,
        config: SchedulerConfig | None = None,
        publish: Callable[[list, bool], None] | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
    ):
        self.model = model
        self.cfg = config or SchedulerConfig()
        # a prompt token's prefill cost grows with its position (attention over what came
        # before): relative to the weights' 2 flops per parameter, 4 per head dimension per
        # earlier position and layer, ATTENTION_COST_FACTOR times dearer per flop
        c = model.config
        self._attn_per_pos = (ATTENTION_COST_FACTOR * 4 * c.n_layers * c.n_heads * c.head_dim
                              / (2 * max(1, c.n_params)))
        self.cfg.max_batch = min(self.cfg.max_batch, getattr(model, "max_batch", self.cfg.max_batch))
        self._publish = publish or _default_publish
        self._outbox: list = []
        self.on_step = on_step  # (batch_size, decode_ns, prefill_tokens) after every step
        self.tokenizer = model.tokenizer
        self.allocator = model.kv.allocator
        self.block_size = model.kv.block_size
        self.context_length = model.config.context_length
        self.vocab_size = model.config.vocab_size
        self.max_blocks = model.max_blocks_per_seq
        self.eos_id = self.tokenizer.eos_id

        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.sessions: dict[str, Session] = {}

        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending_new = 0         # submitted, not yet scheduled once (the bounded queue)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        # the decode batch and its input rows: a sequence joins (appended) when its prefill
        # completes and leaves (the last row moves into its place) when it stops running; a full
        # rebuild (``_batch_dirty``) only when the pool runs dry. A step writes each row's token.
        self._batch: list[Sequence] = []
        self._batch_reqs: list[Request] = []
        self._batch_dirty = True
        self._bt = np.zeros((self.cfg.max_batch, self.max_blocks), dtype=np.int32)
        self._tok = np.zeros(self.cfg.max_batch, dtype=np.int32)
        self._pos = np.zeros(self.cfg.max_batch, dtype=np.int32)
        self._n_partial = 0                  # running sequences whose prefill is not complete
        self._joined: dict = {}              # see DecodeStep.joined
        self._next_deadline_ns = NO_DEADLINE  # earliest deadline of a live request (or later)
        self._next_expiry_check = 0.0

        # observable counters (read from other threads; plain ints)
        self.steps = 0
        self.last_batch_size = 0
        self.max_batch_seen = 0
        self.decode_ns_total = 0
        self.preemptions = 0

    # ---------------------------------------------------------------- event hand-off

    def publish(self, items) -> None:
        """Queue events; they leave at the next flush point (engine thread only)."""
        self._outbox.extend(items)

    def _flush(self) -> None:
        """Hand queued events to the publisher. Called right before the engine enters a model
        call (which releases the GIL): the threads this wakes then stream the tokens while the
        engine computes, instead of contending with the engine's own Python between steps."""
        if self._outbox:
            items, self._outbox = self._outbox, []
            self._publish(items, len(self._batch) <= 1)

    # ---------------------------------------------------------------- thread-safe front

    def submit(self, req: Request) -> None:
        """Queue a request; raise QueueFull beyond ``max_waiting``, SchedulerClosed when draining."""
        with self._lock:
            if not self._accepting:
                raise SchedulerClosed("the server is shutting down and takes no new requests")
            # submitted requests the batch has room for are about to run, not waiting (a burst
            # on an idle engine is not refused before the engine has admitted any of it)
            waiting = self._pending_new - max(0, self.cfg.max_batch - len(self.running))
            if waiting >= self.cfg.max_waiting:
                raise QueueFull(
                    f"waiting queue is full: {waiting} requests waiting, "
                    f"limit max_waiting={self.cfg.max_waiting}"
                )
            self._pending_new += 1
            req.submitted_ns = time.monotonic_ns()
            self._inbox.append(("submit", req))
        self._wake.set()

    def cancel(self, req: Request) -> None:
        self._inbox.append(("cancel", req))
        self._wake.set()

    def open_session(self, idle_timeout_s: float | None = None, owner: Any = None) -> Session:
        with self._lock:
            if not self._accepting:
                raise SchedulerClosed("the server is shutting down and takes no new sessions")
            live = sum(1 for s in self.sessions.values() if not s.closed)
            if live >= self.cfg.max_sessions:
                raise QueueFull(f"too many open sessions: limit max_sessions={self.cfg.max_sessions}")
            s = Session(idle_timeout_s or self.cfg.session_idle_timeout_s, owner)
            self.sessions[s.session_id] = s
        return s

    def close_session(self, session: Session, reason: str = "client") -> None:
        self._inbox.append(("close", session, reason))
        self._wake.set()

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def finish_all(self, reason: str = FINISH_SHUTDOWN) -> None:
        """End every waiting and running request with ``reason`` (next step) and close sessions."""
        self._inbox.append(("finish_all", reason))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + self._pending_inbox()

    def _pending_inbox(self) -> int:
        return sum(1 for c in list(self._inbox) if c[0] == "submit")

    @property
    def num_running(self) -> int:
        return len(self.running)

    def kv_usage(self) -> float:
        return float(self.allocator.usage())

    def idle(self) -> bool:
        return not self.running and not self.waiting and not self._inbox

    # ---------------------------------------------------------------- engine thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="wafer-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        while not self._stop:
            try:
                if self._inbox:
                    self._apply_commands()
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

    def step(self) -> None:
        if time.monotonic_ns() >= self._next_deadline_ns:
            self._expire_deadlines()
        items: list = []
        batch = self._decode(items)
        if items:
            self.publish(items)
        items = []
        n_prefill = self._prefill(items, decoding=batch > 0)
        if items:
            self.publish(items)
        if batch == 0 and n_prefill == 0 and (self.waiting or self.running):
            self._unstick()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(batch, self._last_decode_ns, n_prefill)
        if not self._has_model_work():  # no model call coming to flush before: flush now
            self._flush()

    def _has_model_work(self) -> bool:
        return bool(self.running) or bool(self.waiting and len(self.running) < self.cfg.max_batch)

    def _expire_deadlines(self) -> None:
        now = time.monotonic_ns()
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

    def _enter_running(self, seq: Sequence) -> None:
        self.running.append(seq)
        if seq.prefilling:
            self._n_partial += 1

    def _leave_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.prefilling:
            self._n_partial -= 1
        if seq.row >= 0:
            self._batch_remove(seq)

    def _batch_add(self, seq: Sequence) -> None:
        """A sequence ready to decode takes the next row of the batch."""
        i = len(self._batch)
        seq.row = i
        self._batch.append(seq)
        self._batch_reqs.append(seq.req)
        self._tok[i] = seq.tokens[seq.n_tokens - 1]
        self._pos[i] = seq.n_tokens - 1
        self._bt[i] = seq.table
        B = i + 1
        for other in self._batch:
            if other.max_batch < B:
                other.max_batch = B

    def _batch_remove(self, seq: Sequence) -> None:
        """The last row moves into the leaving sequence's place."""
        i, last = seq.row, len(self._batch) - 1
        if i != last:
            moved = self._batch[last]
            self._batch[i] = moved
            self._batch_reqs[i] = self._batch_reqs[last]
            self._tok[i] = self._tok[last]
            self._pos[i] = self._pos[last]
            self._bt[i] = self._bt[last]
            moved.row = i
        self._batch.pop()
        self._batch_reqs.pop()
        seq.row = -1

    # ---------------------------------------------------------------- commands

    def _apply_commands(self) -> None:
        n_before = len(self._outbox)
        while self._inbox:
            cmd = self._inbox.popleft()
            kind = cmd[0]
            if kind == "submit":
                self._admit_request(cmd[1])
            elif kind == "cancel":
                req = cmd[1]
                if not req.done and req.seq is not None:
                    self._finish(req.seq, FINISH_CANCELLED, None)
                elif not req.done:  # cancelled before it was admitted (still in the inbox order)
                    req.done = True
            elif kind == "close":
                self._close_session(cmd[1], cmd[2])
            elif kind == "finish_all":
                for seq in list(self.running) + list(self.waiting):
                    self._finish(seq, cmd[1], None)
                for s in list(self.sessions.values()):
                    self._close_session(s, "shutdown")
        if len(self._outbox) > n_before:  # cancellations and refusals answer at once
            self._flush()

    def _unqueue(self) -> None:
        with self._lock:
            self._pending_new -= 1

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
            old = seq.token_list()
            if req.replace:
                target = list(req.prompt)
                common = 0
                limit = min(seq.num_computed, len(target))
                while common < limit and old[common] == target[common]:
                    common += 1
            else:
                target = old + list(req.prompt)
                common = seq.num_computed
            if len(target) > self.context_length:
                self._unqueue()
                req.done = True
                self.publish([(req, FinishEvent(FINISH_LENGTH, SeqStats(), error=(
                    f"conversation of {len(target)} tokens exceeds the model's context of "
                    f"{self.context_length}")))])
                return
            cached = min(common, len(target) - 1)
            self._truncate(seq, cached)
            seq.set_tokens(target)
            sess.active = req
            sess.last_active = time.monotonic()
        else:
            seq = Sequence(self.context_length, self.max_blocks)
            seq.set_tokens(list(req.prompt))
            cached = 0
        self._begin_turn(seq, req, cached)
        self._enqueue(seq)

    def _begin_turn(self, seq: Sequence, req: Request, cached: int) -> None:
        p = req.params
        seq.req = req
        req.seq = seq
        seq.prompt_len = seq.n_tokens
        seq.end = min(seq.n_tokens + p.max_tokens, self.context_length)
        seq.max_batch = 0
        seq.sampler = Sampler(p, self.vocab_size)
        seq.greedy = p.temperature == 0.0 and p.repetition_penalty == 1.0
        ids = set(p.stop_token_ids)
        if self.eos_id is not None and not p.ignore_eos:
            ids.add(self.eos_id)
        seq.stop_ids = frozenset(ids)
        seq.n_logprobs = int(getattr(p, "logprobs", 0) or 0)
        seq.stopper = StopChecker(p, self.tokenizer, self.eos_id) if p.stop else None
        if req.deadline_ns is not None:
            self._next_deadline_ns = min(self._next_deadline_ns, req.deadline_ns)
        seq.prefilling = True
        seq.scheduled = False
        seq.stats = SeqStats(
            prompt_tokens=seq.n_tokens,
            cached_tokens=cached,
            arrival_ns=req.arrival_ns,
        )

    def _truncate(self, seq: Sequence, n: int) -> None:
        """Keep the KV of the first ``n`` tokens; free the blocks past them."""
        seq.num_computed = min(seq.num_computed, n)
        keep = math.ceil(seq.num_computed / self.block_size)
        if len(seq.blocks) > keep:
            self.allocator.free(seq.blocks[keep:])
            del seq.blocks[keep:]

    def _free(self, seq: Sequence) -> None:
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        seq.num_computed = 0

    def _close_session(self, sess: Session, reason: str) -> None:
        if sess.closed:
            return
        if sess.active is not None and not sess.active.done and sess.seq is not None:
            self._finish(sess.seq, FINISH_CANCELLED if reason == "client" else FINISH_SHUTDOWN, None)
        sess.closed = True
        sess.close_reason = reason
        if sess.seq is not None:
            self._free(sess.seq)
        self.sessions.pop(sess.session_id, None)
        if reason != "client" and sess.owner is not None:
            self.publish([(sess, SessionExpired(reason))])

    def _expire_sessions(self) -> None:
        if not self.sessions:
            return
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + SESSION_EXPIRY_CHECK_S
        for s in list(self.sessions.values()):
            idle = s.active is None or s.active.done
            if idle and now - s.last_active > s.idle_timeout_s:
                log.info("session %s idle for %.0f s: expired", s.session_id, now - s.last_active)
                self._close_session(s, "idle")

    # ---------------------------------------------------------------- blocks

    def _ensure_blocks(self, seq: Sequence, n_tokens: int) -> bool:
        """Make ``seq`` own enough blocks to hold ``n_tokens`` positions. False if the pool is dry."""
        need = math.ceil(n_tokens / self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        try:
            new = self.allocator.allocate(need)
        except OutOfBlocks:
            return False
        table = seq.table
        for k, b in enumerate(new, len(seq.blocks)):  # scalar stores: a decode grows one block
            table[k] = b
        seq.blocks.extend(new)
        return True

    def _evict_idle_session(self) -> bool:
        """Drop the KV of the least recently used idle session (it recomputes on its next turn)."""
        idle = [
            s for s in self.sessions.values()
            if s.seq is not None and s.seq.blocks and (s.active is None or s.active.done)
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_active)
        log.info("KV pool full: dropping the cache of idle session %s", victim.session_id)
        self._free(victim.seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        log.info("KV pool full: preempting sequence %d, request %r (recompute later)", seq.seq_id,
                 seq.req.request_id if seq.req is not None else "")
        self._free(seq)
        self._leave_running(seq)
        seq.prefilling = True
        seq.stats.preemptions += 1
        self.preemptions += 1
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """Waiting sequences stay in arrival order (a preempted one goes back to its place), so the
        head of the queue is the oldest one waiting."""
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].stats.arrival_ns > seq.stats.arrival_ns:
            i -= 1
        self.waiting.insert(i, seq)

    def _unstick(self) -> None:
        """Nothing could run this step: the pool is held by sequences that cannot proceed. Free the
        blocks of the newest holder other than the oldest sequence (an idle session's cache first),
        so the oldest makes progress; if the oldest holds every used block, it alone cannot fit."""
        if self._evict_idle_session():
            return
        live = list(self.running) + list(self.waiting)
        oldest = min(live, key=lambda s: s.stats.arrival_ns)
        holders = [s for s in live if s.blocks and s is not oldest]
        if holders:
            victim = max(holders, key=lambda s: s.stats.arrival_ns)
            if victim in self.running:
                self._preempt(victim)
            else:  # a session turn waiting with its cached prefix: drop the cache
                log.info("KV pool full: dropping the cached prefix of waiting sequence %d, request %r",
                         victim.seq_id, victim.req.request_id if victim.req is not None else "")
                self._free(victim)
                victim.stats.cached_tokens = 0
            return
        if self.allocator.num_used == len(oldest.blocks):
            self._finish(oldest, FINISH_ERROR, None, error=(
                f"sequence of {oldest.n_tokens} tokens does not fit the KV pool of "
                f"{self.model.kv.num_blocks} blocks x {self.block_size} tokens"))

    # ---------------------------------------------------------------- decode

    _last_decode_ns = 0
    _prefill_ns_prev = 0

    def _decode(self, items: list) -> int:
        batch = self._batch
        if not self._batch_dirty:  # the batch as kept: give a new block where one is needed
            capacity = self.block_size
            for i, seq in enumerate(batch):
                have = len(seq.blocks)
                if seq.n_tokens > have * capacity:
                    if not self._ensure_blocks(seq, seq.n_tokens):
                        self._batch_dirty = True  # pool dry: rebuild, preempting as needed
                        break
                    for k in range(have, len(seq.blocks)):  # the row's new entries only
                        self._bt[i, k] = seq.blocks[k]
        if self._batch_dirty:
            batch = self._build_batch()
        self._last_decode_ns = 0
        if not batch:
            return 0
        B = len(batch)
        self._flush()
        t0 = time.monotonic_ns()
        logits = self.model.decode(self._tok[:B], self._pos[:B], self._bt[:B])
        now = time.monotonic_ns()
        dt = now - t0
        self._last_decode_ns = dt
        # engine time since these sequences' previous tokens: this decode plus the prefill work
        # interleaved after the previous decode
        engine_ns = dt + self._prefill_ns_prev
        self.decode_ns_total += dt
        self.last_batch_size = B
        if B > self.max_batch_seen:
            self.max_batch_seen = B
        tokens = self.model.picks[:B].tolist()  # each row's argmax (the greedy choice)
        lps = None
        finished = []
        tok_in, pos_in = self._tok, self._pos
        # the only per-sequence work on the engine thread: the token, and whether it ends the turn
        for i, seq in enumerate(batch):
            if not seq.greedy:
                tokens[i] = int(seq.sampler.sample(logits[i], seq.tokens[: seq.n_tokens]))
            tok = tokens[i]
            if seq.n_logprobs:
                lps = lps or {}
                lps[i] = logprobs_topn(logits[i], tok, seq.n_logprobs)
            seq.num_computed = n = seq.n_tokens
            seq.tokens[n] = tok
            seq.n_tokens = n + 1
            tok_in[i] = tok  # the next step's inputs, unless the batch changes
            pos_in[i] = n
            reason = self._end_reason(seq, tok)
            if reason is not None:
                finished.append((seq, reason))
        joined = None
        if self._joined:
            joined, self._joined = self._joined, {}
        items.append((None, DecodeStep(self._batch_reqs[:], tokens, engine_ns, B, now, lps, joined)))
        for seq, reason in finished:
            self._finish(seq, reason, items)
        return B

    def _build_batch(self) -> list[Sequence]:
        """The running sequences ready to decode, oldest first, each with a block for its next
        token (preempting the newest when the pool is dry); fills the step's input rows."""
        for seq in self._batch:
            seq.row = -1
        self._batch, self._batch_reqs = [], []
        ready = [s for s in self.running if not s.prefilling]
        ready.sort(key=lambda s: s.stats.arrival_ns)
        batch: list[Sequence] = []
        for seq in ready:
            if seq not in self.running:  # preempted for an older one in this loop
                continue
            while not self._ensure_blocks(seq, seq.n_tokens):
                if self._evict_idle_session():
                    continue
                victims = [s for s in self.running if s not in batch]
                victim = max(victims, key=lambda s: s.stats.arrival_ns)
                self._preempt(victim)  # the newest loses its blocks, possibly seq itself
                if victim is seq:
                    break
            else:
                batch.append(seq)
        for seq in batch:
            self._batch_add(seq)
        self._batch_dirty = False
        return self._batch

    # ---------------------------------------------------------------- prefill

    def _chunk_at(self, start: int) -> int:
        """The most prompt tokens from position ``start`` on that cost about as much as
        prefill_budget_idle tokens at the start of a prompt (so a step deep into a long prompt
        is no longer than one at its beginning: cancels and deadlines wait for a step)."""
        return max(16, int(self.cfg.prefill_budget_idle / (1.0 + self._attn_per_pos * start)))

    def _prefill(self, items: list, decoding: bool) -> int:
        self._prefill_ns_prev = 0
        if not self._n_partial and not self.waiting:
            return 0
        budget = self.cfg.prefill_chunk if decoding else self.cfg.prefill_budget_idle
        done = 0
        # continue chunked prefills of running sequences first, then admit waiting ones
        queue = [s for s in self.running if s.prefilling] if self._n_partial else []
        while budget > 0:
            if queue:
                seq = queue.pop(0)
            elif self.waiting and len(self.running) < self.cfg.max_batch:
                seq = self.waiting[0]
            else:
                break
            remaining = seq.n_tokens - seq.num_computed
            limit = min(budget, self._chunk_at(seq.num_computed))
            if remaining > limit and done:
                break  # split only the first prefill of a step: a short prompt is never cut in two
            n = min(remaining, limit)
            if not self._ensure_blocks(seq, seq.num_computed + n):
                if seq in self.waiting and self._evict_idle_session():
                    if not self._ensure_blocks(seq, seq.num_computed + n):
                        break
                else:
                    break
            if seq in self.waiting:
                self.waiting.popleft()
                self._enter_running(seq)
                if not seq.scheduled:
                    seq.scheduled = True
                    self._unqueue()
                    seq.stats.queue_ns = time.monotonic_ns() - seq.req.submitted_ns
            start = seq.num_computed
            toks = seq.tokens[start : start + n]
            self._flush()
            t0 = time.monotonic_ns()
            logits = self.model.prefill(toks, seq.table, start)
            now = time.monotonic_ns()
            dt = now - t0
            seq.num_computed = start + n
            seq.stats.prefill_tokens += n
            seq.stats.prefill_ns += dt
            self._prefill_ns_prev += dt
            budget -= n
            done += n
            if seq.num_computed == seq.n_tokens:
                seq.prefilling = False
                self._n_partial -= 1
                seq.max_batch = max(seq.max_batch, 1)
                if seq.greedy:
                    tok = int(self.model.picks[0])
                else:
                    tok = int(seq.sampler.sample(logits, seq.tokens[: seq.n_tokens]))
                self._emit_after_prefill(seq, tok, logits, now, items)
                if seq.req is not None:  # still going: it decodes from the next step on
                    self._batch_add(seq)
                    self._joined[seq.req] = self._prefill_ns_prev
                    if not decoding:  # the rest of this step's prefill now delays its second
                        decoding = True  # token: a step with a decode gets the smaller budget
                        budget = min(budget, self.cfg.prefill_chunk)
                # queued now: it leaves before the next model call, not after this step's prefills
                self.publish(items[:])
                items.clear()
                if len(self._batch) <= 1:  # a lone stream: the engine hands it over itself, at once
                    self._flush()
        return done

    # ---------------------------------------------------------------- emitting / finishing

    def _emit_after_prefill(self, seq: Sequence, tok: int, logits: np.ndarray, now: int,
                            items: list) -> None:
        """The token a completed prefill sampled (a turn's first, or the next after a
        preemption's recompute): append it, queue its event, finish the turn if it is done."""
        lp, top = logprobs_topn(logits, tok, seq.n_logprobs) if seq.n_logprobs else (None, None)
        seq.append(tok)
        st = seq.stats
        if st.first_token_ns == 0:
            st.first_token_ns = now
        items.append((seq.req, TokenEvent(tok, st.prefill_ns, 1, now, lp, top, len(self.running))))
        reason = self._end_reason(seq, tok)
        if reason is not None:
            self._finish(seq, reason, items)

    @staticmethod
    def _end_reason(seq: Sequence, tok: int) -> str | None:
        """Whether the token just appended ends the turn (and why)."""
        if seq.stopper is not None:  # stop strings: the same checker the consumer runs for text
            reason = seq.stopper.push(tok)[1]
        elif tok in seq.stop_ids:
            reason = FINISH_STOP
        else:
            reason = None
        if reason is None and seq.n_tokens >= seq.end:
            reason = FINISH_LENGTH
        return reason

    def _finish(self, seq: Sequence, reason: str, items: list, error: str | None = None) -> None:
        req = seq.req
        if req is None or req.done:
            return
        req.done = True
        st = seq.stats
        st.finish_ns = time.monotonic_ns()
        st.completion_tokens = max(0, seq.n_tokens - seq.prompt_len)
        st.max_batch_size = seq.max_batch
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %r (sequence %d) finished: %s%s; %d prompt tokens (%d cached) + %d "
                      "completion, %d preemption(s)", req.request_id, seq.seq_id, reason,
                      f" ({error})" if error else "", st.prompt_tokens, st.cached_tokens,
                      st.completion_tokens, st.preemptions)
        if seq in self.running:
            self._leave_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            if not seq.scheduled:
                seq.scheduled = True
                self._unqueue()
        sess = req.session
        if sess is None:
            self._free(seq)
        else:
            sess.active = None
            sess.last_active = time.monotonic()
            # keep the blocks: the next turn reuses them. A half-prefilled sequence keeps what it has.
            if seq.num_computed > seq.n_tokens:
                seq.num_computed = seq.n_tokens
        seq.req = None
        ev = FinishEvent(reason, st, error)
        if items is None:
            self.publish([(req, ev)])
        else:
            items.append((req, ev))

    def _fail_all(self, message: str) -> None:
        for seq in list(self.running) + list(self.waiting):
            try:
                self._finish(seq, FINISH_ERROR, None, error=message)
            except Exception:
                log.exception("while failing a sequence")
            self._free(seq)
        self.running.clear()
        self.waiting.clear()
        self._n_partial = 0
        for seq in self._batch:
            seq.row = -1
        self._batch, self._batch_reqs = [], []
        self._batch_dirty = True
