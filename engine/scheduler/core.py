"""The engine thread's model work: one batched decode, prefill within a token budget,
finishing, and preemption when the KV pool runs dry (how a step goes is told in the package's
docstring, engine/scheduler/__init__.py). :class:`engine.scheduler.Scheduler` is built on this:
the step's order, the loop, the commands and the thread-safe front."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import numpy as np

from engine.sampling import logprobs_topn
from engine.scheduler.batch import DecodeBatch
from engine.scheduler.blocks import BlockManager, newest, unstick_victim
from engine.scheduler.commands import Inbox
from engine.scheduler.config import SchedulerConfig
from engine.scheduler.events import FINISH_ERROR, DecodeStep, FinishEvent, TokenEvent, iter_events
from engine.scheduler.sequence import Sequence
from engine.scheduler.sessions import SessionStore
from engine.scheduler.verify import SpeculativeSteps

log = logging.getLogger(__name__)

NO_DEADLINE = 1 << 62
ATTENTION_COST_FACTOR = 3.0  # prefill attention's cost per flop against the weights' matmuls
                             # (SmolLM2-135M, 2 cores: a 6500-token prompt took 72.7 s, ~3.4x)


def _default_publish(items, quiet: bool = False) -> None:
    for req, ev in iter_events(items):
        if req.on_event is not None:
            req.on_event(ev)


class SchedulerCore(SpeculativeSteps):
    """The engine thread's state and model work (see :class:`engine.scheduler.Scheduler`,
    its public face, for the arguments' meaning).

    ``publish(items, quiet)`` receives the events (see the package docstring); ``on_step(batch,
    decode_ns, prefill_tokens)`` is called after every step; ``clock`` is the monotonic clock in
    ns the engine times its work and deadlines with."""

    def __init__(self, model, config: SchedulerConfig | None = None,
                 publish: Callable[[list, bool], None] | None = None,
                 on_step: Callable[[int, int, int], None] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns):
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
        self.on_step = on_step
        self._now = clock
        self.tokenizer = model.tokenizer
        self.allocator = model.kv.allocator
        self.blocks = BlockManager(self.allocator, model.kv.block_size, self.cfg.prefix_caching)
        self.block_size = model.kv.block_size
        self.context_length = model.config.context_length
        self.vocab_size = model.config.vocab_size
        self.max_blocks = model.max_blocks_per_seq
        self.eos_id = self.tokenizer.eos_id

        self.waiting: collections.deque[Sequence] = collections.deque()  # oldest first
        self.running: list[Sequence] = []    # holding KV (prefilling in chunks, or decoding)
        self.sessions = SessionStore(self.cfg.max_sessions)
        self.batch = DecodeBatch(self.cfg.max_batch, self.max_blocks)

        self._inbox = Inbox(self.cfg.max_waiting, clock)
        self._lock = self._inbox.lock
        self._wake = self._inbox.wake
        self._stop = False
        self._thread: threading.Thread | None = None
        self._n_partial = 0                  # running sequences whose prefill is not complete
        self._joined: dict = {}              # see DecodeStep.joined
        self._next_deadline_ns = NO_DEADLINE  # earliest deadline of a live request (or later)
        self._last_decode_ns = 0
        self._prefill_ns_prev = 0
        self._speculating = 0                # running sequences with a Speculator
        self._max_rows = min(self.batch.rows, getattr(model, "max_chunk", self.batch.rows))

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
            self._publish(items, len(self.batch.seqs) <= 1)

    def _enter_running(self, seq: Sequence) -> None:
        self.running.append(seq)
        if seq.prefilling:
            self._n_partial += 1
        if seq.spec is not None:
            self._speculating += 1

    def _leave_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.prefilling:
            self._n_partial -= 1
        if seq.spec is not None:
            self._speculating -= 1
        if seq.row >= 0:
            self.batch.remove(seq)

    def _unqueue(self) -> None:
        self._inbox.scheduled()

    # ---------------------------------------------------------------- decode

    def _decode(self, items: list) -> int:
        batch = self.batch
        seqs = batch.seqs
        if not batch.dirty:  # the batch as kept: give a new block where one is needed
            capacity = self.block_size
            bt = batch.tables
            for i, seq in enumerate(seqs):
                have = len(seq.blocks)
                if seq.n_tokens > have * capacity:
                    if not self.blocks.ensure(seq, seq.n_tokens):
                        batch.dirty = True  # pool dry: rebuild, preempting as needed
                        break
                    for k in range(have, len(seq.blocks)):  # the row's new entries only
                        bt[i, k] = seq.blocks[k]
        if batch.dirty:
            seqs = self._build_batch()
        self._last_decode_ns = 0
        if not seqs:
            return 0
        B = len(seqs)
        drafts = self._plan_drafts(seqs) if self._speculating else 0
        tok_in, pos_in = batch.tokens, batch.positions
        self._flush()
        t0 = self._now()
        if drafts:
            logits, picks = self._verify_rows(B, drafts)
        else:
            logits = self.model.decode(tok_in[:B], pos_in[:B], batch.tables[:B])
            picks = self.model.picks
        now = self._now()
        dt = now - t0
        self._last_decode_ns = dt
        # engine time since these sequences' previous tokens: this decode plus the prefill work
        # interleaved after the previous decode
        engine_ns = dt + self._prefill_ns_prev
        self.decode_ns_total += dt
        self.last_batch_size = B
        if B > self.max_batch_seen:
            self.max_batch_seen = B
        if drafts:
            return self._after_verify(items, seqs, logits, picks, engine_ns, now)
        tokens = picks[:B].tolist()  # each row's argmax (the greedy choice)
        lps = None
        finished = []
        # the only per-sequence work on the engine thread: the token, and whether it ends the turn
        for i, seq in enumerate(seqs):
            pol = seq.policy
            if not pol.greedy:
                tokens[i] = pol.pick(logits[i], seq.tokens[: seq.n_tokens])
            tok = tokens[i]
            if pol.n_logprobs:
                lps = lps or {}
                lps[i] = logprobs_topn(logits[i], tok, pol.n_logprobs)
            seq.num_computed = n = seq.n_tokens
            seq.tokens[n] = tok
            seq.n_tokens = n + 1
            tok_in[i] = tok  # the next step's inputs, unless the batch changes
            pos_in[i] = n
            reason = pol.finish_reason(tok, n + 1)
            if reason is not None:
                finished.append((seq, reason))
        self._publish_step(items, tokens, engine_ns, B, now, lps, None, finished)
        return B

    def _publish_step(self, items, tokens, engine_ns, B, now, lps, spec, finished) -> None:
        joined = None
        if self._joined:
            joined, self._joined = self._joined, {}
        items.append((None, DecodeStep(self.batch.reqs[:], tokens, engine_ns, B, now, lps, joined,
                                       spec)))
        for seq, reason in finished:
            self._finish(seq, reason, items)

    def _build_batch(self) -> list[Sequence]:
        """The running sequences ready to decode, oldest first, each with a block for its next
        token (preempting the newest when the pool is dry); fills the step's input rows."""
        self.batch.clear()
        ready = [s for s in self.running if not s.prefilling]
        ready.sort(key=lambda s: s.stats.arrival_ns)
        chosen: list[Sequence] = []
        for seq in ready:
            if seq not in self.running:  # preempted for an older one in this loop
                continue
            while not self.blocks.ensure(seq, seq.n_tokens):
                if self._evict_idle_session():
                    continue
                victim = newest(s for s in self.running if s not in chosen)
                self._preempt(victim)  # the newest loses its blocks, possibly seq itself
                if victim is seq:
                    break
            else:
                chosen.append(seq)
        for seq in chosen:
            self.batch.add(seq)
        self.batch.dirty = False
        return self.batch.seqs

    # ---------------------------------------------------------------- prefill

    def chunk_at(self, start: int) -> int:
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
            gained = 0
            if queue:
                seq = queue.pop(0)
            elif self.waiting and len(self.running) < self.cfg.max_batch:
                seq = self.waiting[0]
                gained = self.blocks.match(seq)  # the cached blocks its prefix continues into
            else:
                break
            remaining = seq.n_tokens - seq.num_computed
            limit = min(budget, self.chunk_at(seq.num_computed))
            if remaining > limit and done:
                self.blocks.unmatch(seq, gained)  # it waits: it holds no cached blocks meanwhile
                break  # split only the first prefill of a step: a short prompt is never cut in two
            n = min(remaining, limit)
            if not self.blocks.ensure(seq, seq.num_computed + n) and not (
                    seq in self.waiting and self._evict_idle_session()
                    and self.blocks.ensure(seq, seq.num_computed + n)):
                self.blocks.unmatch(seq, gained)
                break
            if seq in self.waiting:
                self.waiting.popleft()
                self._enter_running(seq)
                if not seq.stats.first_token_ns:  # not a recompute after its first token
                    seq.stats.cached_tokens = seq.num_computed
                if not seq.scheduled:
                    seq.scheduled = True
                    self._unqueue()
                    seq.stats.queue_ns = self._now() - seq.req.submitted_ns
            start = seq.num_computed
            toks = seq.tokens[start : start + n]
            self._flush()
            t0 = self._now()
            logits = self.model.prefill(toks, seq.table, start)
            now = self._now()
            dt = now - t0
            seq.num_computed = start + n
            self.blocks.commit(seq)  # its full blocks, for the requests that share its prefix
            seq.stats.prefill_tokens += n
            seq.stats.prefill_ns += dt
            self._prefill_ns_prev += dt
            budget -= n
            done += n
            if seq.num_computed == seq.n_tokens:
                seq.prefilling = False
                self._n_partial -= 1
                seq.max_batch = max(seq.max_batch, 1)
                tok = seq.policy.pick(logits, seq.tokens[: seq.n_tokens], self.model.picks[0])
                self._emit_after_prefill(seq, tok, logits, now, items)
                if seq.req is not None:  # still going: it decodes from the next step on
                    self.batch.add(seq)
                    self._joined[seq.req] = self._prefill_ns_prev
                    if not decoding:  # the rest of this step's prefill now delays its second
                        decoding = True  # token: a step with a decode gets the smaller budget
                        budget = min(budget, self.cfg.prefill_chunk)
                # queued now: it leaves before the next model call, not after this step's prefills
                self.publish(items[:])
                items.clear()
                if len(self.batch.seqs) <= 1:  # a lone stream: the engine hands it over itself, at once
                    self._flush()
        return done

    # ---------------------------------------------------------------- emitting / finishing

    def _emit_after_prefill(self, seq: Sequence, tok: int, logits: np.ndarray, now: int,
                            items: list) -> None:
        """The token a completed prefill sampled (a turn's first, or the next after a
        preemption's recompute): append it, queue its event, finish the turn if it is done."""
        n_lp = seq.policy.n_logprobs
        lp, top = logprobs_topn(logits, tok, n_lp) if n_lp else (None, None)
        seq.append(tok)
        st = seq.stats
        if st.first_token_ns == 0:
            st.first_token_ns = now
        items.append((seq.req, TokenEvent(tok, st.prefill_ns, 1, now, lp, top, len(self.running))))
        reason = seq.policy.finish_reason(tok, seq.n_tokens)
        if reason is not None:
            self._finish(seq, reason, items)

    def _finish(self, seq: Sequence, reason: str, items: list, error: str | None = None) -> None:
        req = seq.req
        if req is None or req.done:
            return
        req.done = True
        st = seq.stats
        st.finish_ns = self._now()
        st.completion_tokens = max(0, seq.n_tokens - seq.prompt_len)
        st.max_batch_size = seq.max_batch
        sp = seq.spec
        if sp is not None:
            st.spec_steps, st.spec_draft_tokens = sp.steps, sp.drafted
            st.spec_accepted_tokens, st.spec_accepted_per_pos = sp.accepted, tuple(sp.per_pos)
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
            self.blocks.free(seq)
        else:
            sess.active = None
            sess.last_active = time.monotonic()
            # keep the blocks: the next turn reuses them. A half-prefilled sequence keeps what it has.
            if seq.num_computed > seq.n_tokens:
                seq.num_computed = seq.n_tokens
            self.blocks.commit(seq)  # what it decoded too: others may share the conversation
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
            self.blocks.free(seq)
        self.running.clear()
        self.waiting.clear()
        self._n_partial = 0
        self._speculating = 0
        self.batch.clear()

    # ---------------------------------------------------------------- preemption

    def _evict_idle_session(self) -> bool:
        """Drop the KV of the least recently used idle session (it recomputes on its next turn)."""
        victim = self.sessions.least_recently_used_cache()
        if victim is None:
            return False
        log.info("KV pool full: dropping the cache of idle session %s", victim.session_id)
        self.blocks.free(victim.seq)
        return True

    def _preempt(self, seq: Sequence) -> None:
        log.info("KV pool full: preempting sequence %d, request %r (recompute later)", seq.seq_id,
                 seq.req.request_id if seq.req is not None else "")
        self.blocks.free(seq)
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
        victim, oldest = unstick_victim(self.running, self.waiting)
        if victim is not None:
            if victim in self.running:
                self._preempt(victim)
            else:  # a session turn waiting with its cached prefix: drop the cache
                log.info("KV pool full: dropping the cached prefix of waiting sequence %d, request %r",
                         victim.seq_id, victim.req.request_id if victim.req is not None else "")
                self.blocks.free(victim)
                victim.stats.cached_tokens = 0
            return
        if self.allocator.num_used == len(oldest.blocks):
            self._finish(oldest, FINISH_ERROR, None, error=(
                f"sequence of {oldest.n_tokens} tokens does not fit the KV pool of "
                f"{self.model.kv.num_blocks} blocks x {self.block_size} tokens"))
