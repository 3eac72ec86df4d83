"""One generation's stream (a Generate call or a session turn): engine events -> response chunks.

:class:`StreamState` turns the engine's token events into TokenChunks (text deltas, coalescing,
logprobs, emulated wafer times), paces and stamps them when the model is emulated, and records the
stream's metrics (TTFT, ITL, e2e, token counts) and its Final.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from engine import scheduler as sch
from protos import wafer_pb2 as pb

# finish reasons that end a call with an error status (a session turn: a TurnError)
ERROR_FINISH = {
    sch.FINISH_DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    sch.FINISH_ERROR: grpc.StatusCode.INTERNAL,
}


@dataclass
class StreamState:
    """Text, coalescing, timing and emulation of one generation's stream (Generate call or turn).

    The engine sends token ids; ``detok`` (a StopChecker over the request's parameters, the same
    one the engine runs when there are stop strings) turns them into text deltas here, on the
    event loop, while the engine computes the next step."""

    model_name: str
    arrival_ns: int
    coalesce: int
    metrics: Any
    detok: Any                 # engine.sampling.StopChecker
    emu: Any = None            # emulation.StreamClock
    pending: list = field(default_factory=list)
    pending_text: list = field(default_factory=list)
    n_sent: int = 0
    n_chunked: int = 0         # tokens already put in chunks (the next chunk's index)
    first_sent_ns: int = 0
    last_sent_ns: int = 0
    text: list = field(default_factory=list)
    _itl: Any = None

    def add(self, ev: sch.TokenEvent) -> pb.TokenChunk | None:
        self.pending.append(ev)
        self.pending_text.append(self.detok.push(ev.token_id)[0])
        if len(self.pending) >= self.coalesce:
            return self._chunk()
        return None

    def flush(self, ev: sch.FinishEvent) -> pb.TokenChunk | None:
        """The last chunk: tokens still coalescing, and text held back when the sequence ended
        for a reason other than a stop (context full)."""
        extra_text = self.detok.flush() if ev.reason == sch.FINISH_LENGTH else ""
        if extra_text:
            if self.pending:
                return self._chunk(extra_text)
            return pb.TokenChunk(text=extra_text, index=self.n_chunked)
        return self._chunk() if self.pending else None

    def _chunk(self, extra_text: str = "") -> pb.TokenChunk:
        evs, self.pending = self.pending, []
        texts, self.pending_text = self.pending_text, []
        index = self.n_chunked
        self.n_chunked += len(evs)
        last = evs[-1]
        c = pb.TokenChunk(
            token_ids=[e.token_id for e in evs],
            text="".join(texts) + extra_text,
            index=index,
            engine_step_ns=last.step_ns,
            batch_size=last.batch_size,
        )
        if evs[0].logprob is not None:
            for e in evs:
                c.logprobs.append(pb.TokenLogprobs(
                    logprob=e.logprob, top=[pb.TopLogprob(id=i, logprob=lp) for i, lp in e.top or ()]))
        if self.emu is not None:
            c.sim_time_us.extend(self.emu.next_time_us(e.in_flight or e.batch_size, e.spec_k,
                                                        e.spec_index) for e in evs)
        return c

    async def before_send(self, c: pb.TokenChunk) -> None:
        """Pace (emulation), stamp lateness, record timing and metrics for a chunk about to go."""
        n = len(c.token_ids)
        if self.emu is not None and c.sim_time_us:
            await self.emu.wait_until(c.sim_time_us[-1])
        now = time.monotonic_ns()
        if self.emu is not None and c.sim_time_us:
            # a coalesced chunk leaves when its last token is due (the wafer would hold the
            # earlier ones for it too): each of its tokens is as late as the chunk
            late = self.emu.lateness_us(c.sim_time_us[-1], now, len(c.sim_time_us))
            c.late_us.extend([late] * len(c.sim_time_us))
            if self.metrics is not None:
                h = self.metrics.emulation_lateness.labels(self.model_name)
                for late in c.late_us:
                    h.observe(late / 1e6)
        self.text.append(c.text)
        if n == 0:
            return
        m = self.metrics
        if self.n_sent == 0:
            self.first_sent_ns = now
            if m is not None:
                m.ttft.labels(self.model_name).observe((now - self.arrival_ns) / 1e9)
            gaps = n - 1
            gap = 0.0
        else:
            gaps = n
            gap = (now - self.last_sent_ns) / 1e9 / n
        if m is not None and gaps:
            h = self._itl
            if h is None:
                h = self._itl = m.itl.labels(self.model_name)
            for _ in range(gaps):
                h.observe(gap)
        self.n_sent += n
        self.last_sent_ns = now

    def final(self, ev: sch.FinishEvent) -> pb.Final:
        st = ev.stats
        now = time.monotonic_ns()
        ttft_ms = (self.first_sent_ns - self.arrival_ns) / 1e6 if self.n_sent else 0.0
        itl_ms = ((self.last_sent_ns - self.first_sent_ns) / 1e6 / (self.n_sent - 1)
                  if self.n_sent > 1 else 0.0)
        usage = pb.Usage(
            prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
            cached_tokens=st.cached_tokens, prefill_tokens=st.prefill_tokens,
            ttft_ms=ttft_ms, mean_itl_ms=itl_ms, queue_ms=st.queue_ns / 1e6,
            e2e_ms=(now - self.arrival_ns) / 1e6, max_batch_size=st.max_batch_size,
            preemptions=st.preemptions,
            spec_steps=st.spec_steps, spec_draft_tokens=st.spec_draft_tokens,
            spec_accepted_tokens=st.spec_accepted_tokens,
            spec_acceptance_rate=(st.spec_accepted_tokens / st.spec_draft_tokens
                                  if st.spec_draft_tokens else 0.0),
            spec_mean_accepted_length=(1.0 + st.spec_accepted_tokens / st.spec_steps
                                       if st.spec_steps else 0.0),
        )
        final = pb.Final(finish_reason=ev.reason, usage=usage)
        if self.emu is not None:
            e = self.emu
            final.emulation.CopyFrom(pb.EmulationSummary(
                target=e.emu.target, pace=e.emu.pace, sim_ttft_ms=e.sim_ttft_us / 1e3,
                sim_e2e_ms=e.sim_us / 1e3, max_late_ms=e.max_late_us / 1e3,
                final_lag_ms=e.last_late_us / 1e3, late_tokens=e.late_tokens))
        m = self.metrics
        if m is not None:
            name = self.model_name
            m.e2e.labels(name).observe((now - self.arrival_ns) / 1e9)
            if st.queue_ns:
                m.queue.labels(name).observe(st.queue_ns / 1e9)
            if st.prefill_ns:
                m.prefill_time.labels(name).observe(st.prefill_ns / 1e9)
            m.prompt_tokens.labels(name).inc(st.prompt_tokens)
            m.prefix_queries.labels(name).inc(st.prompt_tokens)
            m.prefix_hits.labels(name).inc(st.cached_tokens)
            m.generation_tokens.labels(name).inc(st.completion_tokens)
            if st.cached_tokens:
                m.cached_tokens.labels(name).inc(st.cached_tokens)
            if st.preemptions:
                m.preemptions.labels(name).inc(st.preemptions)
            if st.spec_steps:
                m.record_speculation(name, st)
            if ev.reason != sch.FINISH_DEADLINE:  # counted as an error with the call's status
                m.request_success.labels(name, ev.reason).inc()
        return final
