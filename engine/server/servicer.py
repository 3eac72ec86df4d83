"""The wafer.v1.Wafer gRPC servicer: validation, streaming, sessions, metrics.

Requests are validated here (INVALID_ARGUMENT naming the field and its limit), turned into
:class:`engine.scheduler.Request` objects and handed to the model's scheduler. The engine thread
publishes token events into a per-stream asyncio queue (one ``call_soon_threadsafe`` per step and
event loop); this side coalesces them into messages, stamps/paces them when the model is emulated,
and records metrics. The servicer knows nothing of Numba.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import grpc

from engine import scheduler as sch
from engine.sampling import SamplingParams
from engine.server import registry as reg
from engine.tokenizer import LONG_TEXT_CHARS
from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "wafer.v1.Wafer"
DEFAULT_MAX_TOKENS = 256
MAX_COALESCE = 256
DEADLINE_SLACK_S = 0.05  # a call abandoned this close to its deadline counts as DEADLINE_EXCEEDED
ROLES = ("system", "user", "assistant")
MAX_QUEUED_TURNS = 4  # session turns sent while one runs wait in order, up to this many
MAX_ID_CHARS = 256  # request_id, turn_id
MAX_IDLE_TIMEOUT_S = 86_400  # a session a client asks to keep while idle: at most a day
PROBE_CHARS_PER_TOKEN = 8  # a prompt longer than context x this is first checked on a prefix


class Invalid(Exception):
    """A request the server refuses; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str, md: tuple = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.md = md  # trailing metadata that goes with the status


def _invalid(msg: str) -> Invalid:
    return Invalid(grpc.StatusCode.INVALID_ARGUMENT, msg)


# ------------------------------------------------------------------------- validation


def messages_to_dicts(messages) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise _invalid(f"messages[{i}].role={m.role!r} must be one of {', '.join(ROLES)}")
        out.append({"role": m.role, "content": m.content})
    return out


def _check_fits(tokenizer, what: str, text: str, context_length: int, slack: int = 1) -> None:
    """Refuse a text that cannot fit the context, encoding at most a bounded prefix of it: beyond
    ``context * max_token_chars`` characters no tokenization fits; beyond PROBE_CHARS_PER_TOKEN
    characters per token of context, the token count of a prefix cut at a word boundary decides
    (words are encoded one by one, so such a prefix has no more tokens than the whole).
    Encoding competes for the cores with the decode (a 450k-character prompt stalled a running
    stream ~0.5 s), so a huge prompt must not be encoded whole just to be refused."""
    n = len(text)
    max_chars = context_length * tokenizer.max_token_chars
    if n > max_chars:
        raise _invalid(f"{what}: {n} characters cannot fit the model's context of {context_length} "
                       f"tokens (at most {max_chars} characters)")
    probe = context_length * PROBE_CHARS_PER_TOKEN
    cut = _word_boundary_before(text, probe) if n > probe else -1
    if cut > 0:
        k = len(tokenizer.encode(text[:cut]))
        if k > context_length + slack:
            raise _invalid(f"{what}: more than {context_length} tokens (its first {cut} characters "
                           f"alone are {k}); the model's context is {context_length} tokens")


def _word_boundary_before(text: str, end: int) -> int:
    """The last index in (end/2, end] where a tokenizer's pre-split starts a new piece for sure
    (whitespace; punctuation after a letter or digit; a digit after anything, as digits are split
    singly or in groups from the left), or -1: a prefix cut there encodes to no more tokens than
    the whole text. -1 for a run of letters (one giant word, CJK without punctuation)."""
    for i in range(end, end // 2, -1):
        c, prev = text[i], text[i - 1]
        if c.isspace() or c.isdigit() or (not c.isalnum() and prev.isalnum()):
            return i
    return -1


def prompt_ids(tokenizer, vocab_size: int, which: str | None, msg, context_length: int,
               inputs: str = "messages, text or token_ids") -> tuple[list[int], list[dict] | None]:
    """Token ids for the ``input`` oneof of a GenerateRequest/Turn; also the chat messages. A
    text that cannot fit the context is refused before it is encoded whole."""
    if which is None:
        raise _invalid(f"input: empty prompt; set one of {inputs}")
    if which == "messages":
        if len(msg.messages.messages) > context_length:  # each message renders to a token or more
            raise _invalid(f"messages: {len(msg.messages.messages)} messages cannot fit the model's "
                           f"context of {context_length} tokens")
        msgs = messages_to_dicts(msg.messages.messages)
        if not msgs:
            raise _invalid("messages: empty prompt; give at least one message")
        _check_fits(tokenizer, "messages", "\n".join(m["content"] for m in msgs), context_length,
                    slack=len(msgs))
        return tokenizer.encode_chat(msgs, add_generation_prompt=True), msgs
    if which == "text":
        if not msg.text:
            raise _invalid("text: empty prompt")
        _check_fits(tokenizer, "text", msg.text, context_length)
        return tokenizer.encode(msg.text), None
    ids = list(msg.token_ids.ids)
    if not ids:
        raise _invalid("token_ids: empty prompt")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise _invalid(f"token_ids[{i}]={t} is outside the vocabulary [0, {vocab_size})")
    return ids, None


async def prompt_ids_off_loop(tokenizer, vocab_size: int, which: str | None, msg, context_length: int,
                              **kw) -> tuple[list[int], list[dict] | None]:
    """``prompt_ids``; a long text or long messages are encoded on a worker thread, so the event
    loop keeps streaming other requests' tokens meanwhile (the tokenizer releases the GIL for a
    long text: engine.tokenizer.LONG_TEXT_CHARS)."""
    if which == "text":
        chars = len(msg.text)
    elif which == "messages":
        chars = sum(len(m.content) for m in msg.messages.messages)
    else:
        chars = 0
    if chars > LONG_TEXT_CHARS:
        return await asyncio.to_thread(prompt_ids, tokenizer, vocab_size, which, msg, context_length, **kw)
    return prompt_ids(tokenizer, vocab_size, which, msg, context_length, **kw)


def sampling_params(sp: pb.SamplingParams, *, vocab_size: int, context_length: int,
                    prompt_len: int, kv_tokens: int | None = None):
    """A proto SamplingParams as an engine SamplingParams: unset optional fields take their
    defaults, then the engine's own checks (each names the field and the limit) and the KV pool's."""
    room = context_length - prompt_len
    if room < 1:
        raise _invalid(f"prompt of {prompt_len} tokens leaves no room in the model's context of "
                       f"{context_length} tokens")
    if sp.HasField("max_tokens"):
        max_tokens = sp.max_tokens
    else:  # the default never exceeds what the context or the KV pool can hold
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
        if kv_tokens is not None and kv_tokens - prompt_len >= 1:
            max_tokens = min(max_tokens, kv_tokens - prompt_len)
    params = SamplingParams(
        temperature=sp.temperature if sp.HasField("temperature") else 1.0,
        top_k=int(sp.top_k),
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        min_p=sp.min_p,
        repetition_penalty=sp.repetition_penalty if sp.HasField("repetition_penalty") else 1.0,
        seed=int(sp.seed) if sp.HasField("seed") else None,
        max_tokens=int(max_tokens), stop=tuple(sp.stop), stop_token_ids=tuple(sp.stop_token_ids),
        logprobs=int(sp.logprobs),
    )
    try:
        params.validate(vocab_size, context_length, prompt_len)
    except ValueError as e:
        raise _invalid(str(e)) from None
    if kv_tokens is not None and prompt_len + max_tokens > kv_tokens:
        raise _invalid(f"max_tokens={max_tokens}: prompt {prompt_len} + max_tokens {max_tokens} tokens "
                       f"exceed the KV pool of {kv_tokens} tokens")
    return params


def check_id(field: str, value: str) -> None:
    """A client's id goes into logs and replies: bounded, one line."""
    if len(value) > MAX_ID_CHARS:
        raise _invalid(f"{field} has {len(value)} characters, limit {MAX_ID_CHARS}")
    if any(c in value for c in "\r\n"):
        raise _invalid(f"{field} must be one line (no line breaks)")


def coalesce_of(n: int) -> int:
    if n == 0:
        return 1
    if not 1 <= n <= MAX_COALESCE:
        raise _invalid(f"coalesce_tokens={n} must be in [1, {MAX_COALESCE}]")
    return n


# ------------------------------------------------------------------------- one stream


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
            c.sim_time_us.extend(self.emu.next_time_us(e.in_flight or e.batch_size) for e in evs)
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
            m.generation_tokens.labels(name).inc(st.completion_tokens)
            if st.cached_tokens:
                m.cached_tokens.labels(name).inc(st.cached_tokens)
            if st.preemptions:
                m.preemptions.labels(name).inc(st.preemptions)
            if ev.reason != sch.FINISH_DEADLINE:  # counted as an error with the call's status
                m.request_success.labels(name, ev.reason).inc()
        return final


class Publisher:
    """The Scheduler's ``publish`` hook: hands each step's events to the event loop(s).

    Each request's (or session's) ``owner`` is ``(loop, asyncio.Queue)``; the queue receives
    ``(request, event)`` pairs, with one ``call_soon_threadsafe`` per loop per batch.

    The hop normally runs on a small notifier thread, not on the engine thread: waking the event
    loop is a syscall that releases the GIL, and the loop then holds it while it streams the step's
    tokens; done on the engine thread, that would delay the next decode by the loop's whole turn
    (measured ~0.7 ms per step with one stream; handing every prefill's first token over that way
    raised the 16-stream per-token overhead p50 from ~200 to ~370 us). The engine only puts the
    batch on a SimpleQueue. When at most one sequence is decoding (``quiet``) and the events hold
    no decode step (a prefill's first token, a finish), the loop's turn is short and no other
    stream waits on it, so the engine hands them over itself: one thread wake-up (~0.2 ms) less
    before a lone request's first token. ``after_hop`` (e.g. recording the engine's step metrics)
    runs on the notifier thread after each hand-off.
    """

    def __init__(self, after_hop: Callable[[], None] | None = None) -> None:
        self._after_hop = after_hop
        self._pending: queue.SimpleQueue = queue.SimpleQueue()  # put() is the cheapest wake-up
        # batches queued (written by the publishing thread only) and handed over by the notifier
        # thread (written by it only): events go directly only when nothing queued is still in
        # flight, so a stream's events never overtake each other
        self._queued = 0
        self._handed = 0
        self._thread = threading.Thread(target=self._run, name="wafer-publisher", daemon=True)
        self._thread.start()

    def __call__(self, items, quiet: bool = False) -> None:
        if quiet and self._handed == self._queued and all(req is not None for req, _ in items):
            self._hand_over([items])
        else:
            self._queued += 1
            self._pending.put(items)

    @property
    def native_id(self) -> int:
        return self._thread.native_id

    def close(self) -> None:
        self._pending.put(None)

    @staticmethod
    def _deliver(items) -> None:
        for q, item in items:
            q.put_nowait(item)

    def _hand_over(self, batches) -> None:
        by_loop: dict = {}
        for items in batches:
            for req, ev in sch.iter_events(items):
                owner = req.owner
                if owner is None:
                    continue
                loop, q = owner
                by_loop.setdefault(loop, []).append((q, (req, ev)))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # loop closed: the stream is gone
                pass

    def _run(self) -> None:
        while True:
            batches = [self._pending.get()]
            while True:  # everything queued meanwhile goes in the same hop
                try:
                    batches.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            closing = None in batches
            self._hand_over([b for b in batches if b is not None])
            self._handed += len(batches) - closing
            if closing:
                return
            if self._after_hop is not None:
                self._after_hop()


# ------------------------------------------------------------------------- servicer


def abandoned_status(time_remaining: float | None) -> str:
    """The status a client saw for a call that ended before its final. A client's own timer
    usually ends the call first, when the server's copy of the deadline still has a few
    milliseconds left (it started counting when the request arrived)."""
    if time_remaining is not None and time_remaining <= DEADLINE_SLACK_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


_ERROR_FINISH = {
    sch.FINISH_DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    sch.FINISH_ERROR: grpc.StatusCode.INTERNAL,
}


class WaferServicer(pb_grpc.WaferServicer):
    def __init__(self, server):
        self.server = server  # engine.server.app.WaferServer: registry, runtimes, metrics, draining
        self.active_streams = 0
        self._call_ids = itertools.count(1)  # names the calls that bring no request_id, in logs

    # ---------------------------------------------------------------- helpers

    def _resolve(self, name: str):
        """(entry, runtime) for a model name; Invalid for unknown / retired / not ready."""
        try:
            entry = self.server.registry.resolve(name)
        except reg.UnknownModel as e:
            raise Invalid(grpc.StatusCode.NOT_FOUND, str(e)) from None
        except reg.RetiredModel as e:
            raise Invalid(grpc.StatusCode.FAILED_PRECONDITION, str(e), e.entry.retirement_metadata()) from None
        rt = self.server.runtime_for(entry)
        if self.server.draining:
            raise Invalid(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if rt is None or not rt.is_ready:
            raise Invalid(grpc.StatusCode.UNAVAILABLE, f"model={entry.name!r} is not loaded yet")
        return entry, rt

    def _count_error(self, model_name: str, code: str) -> None:
        if self.server.metrics is not None:
            self.server.metrics.request_errors.labels(self._metric_label(model_name), code).inc()

    async def _abort(self, context, e: Invalid, model_name: str = "", md=()) -> None:
        self._count_error(model_name, e.code.name)
        try:
            await context.abort(e.code, e.message, trailing_metadata=tuple(md) + tuple(e.md))
        except grpc.aio.AbortError:  # how abort ends the call
            raise
        except Exception:
            if not context.done():
                raise
            # the call ended meanwhile (its deadline): nothing to send, and no traceback in the
            # log for it (gRPC logs one at ERROR when a handler lets this escape)

    def _count_abandoned(self, context, model_name: str) -> None:
        """A request whose call ended before its final (gRPC's own deadline, a cancel, a
        disconnect) is counted as an error under the status the client saw."""
        if self.server.metrics is None:
            return
        self._count_error(model_name, abandoned_status(context.time_remaining()))

    def _metric_label(self, name: str) -> str:
        """A model's registry name for a metric label: a name no model has is "unknown", so
        clients cannot create label values (time series) at will."""
        try:
            return self.server.registry.lookup(name).name
        except reg.UnknownModel:
            return "unknown"

    def _deadline_ns(self, context) -> int | None:
        remaining = context.time_remaining()
        if remaining is None:
            return None
        return time.monotonic_ns() + int(remaining * 1e9)

    # ---------------------------------------------------------------- Generate

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.monotonic_ns()
        md: tuple = ()
        name = request.model
        try:
            entry, rt = self._resolve(request.model)
            name = entry.name
            md = entry.deprecation_metadata()
            if md:
                context.set_trailing_metadata(md)
            cfg = rt.config
            which = request.WhichOneof("input")
            ids, _ = await prompt_ids_off_loop(rt.tokenizer, cfg.vocab_size, which, request, cfg.context_length)
            if len(ids) >= cfg.context_length:
                raise _invalid(f"{which}: prompt of {len(ids)} tokens leaves no room to generate in the "
                               f"model's context of {cfg.context_length} tokens (at most "
                               f"{cfg.context_length - 1})")
            params = sampling_params(request.sampling, vocab_size=cfg.vocab_size,
                                     context_length=cfg.context_length, prompt_len=len(ids),
                                     kv_tokens=rt.kv_tokens)
            coalesce = coalesce_of(request.coalesce_tokens)
            check_id("request_id", request.request_id)
        except Invalid as e:
            await self._abort(context, e, name, md)
            return

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = sch.Request(ids, params, request_id=request.request_id or f"g{next(self._call_ids)}",
                          deadline_ns=self._deadline_ns(context), owner=(loop, q), arrival_ns=arrival)
        try:
            rt.scheduler.submit(req)
        except sch.QueueFull as e:
            await self._abort(context, Invalid(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)), name, md)
            return
        except sch.SchedulerClosed as e:
            await self._abort(context, Invalid(grpc.StatusCode.UNAVAILABLE, str(e)), name, md)
            return

        state = StreamState(name, arrival, coalesce, self.server.metrics, rt.detokenizer(params),
                            rt.emulator.stream(arrival, len(ids), 0) if rt.emulator else None)
        self.active_streams += 1
        ended = False  # the call's end (final or error status) was handed to gRPC
        try:
            while True:
                _, ev = await q.get()
                if isinstance(ev, sch.TokenEvent):
                    c = state.add(ev)
                    if c is not None:
                        await state.before_send(c)
                        yield pb.GenerateResponse(chunk=c)
                    continue
                # FinishEvent
                code = _ERROR_FINISH.get(ev.reason)
                if code is not None:
                    ended = True
                    await self._abort(context, Invalid(code, ev.error or f"request {ev.reason}"), name, md)
                    return
                c = state.flush(ev)
                if c is not None:
                    await state.before_send(c)
                    yield pb.GenerateResponse(chunk=c)
                ended = True
                yield pb.GenerateResponse(final=state.final(ev))
                return
        finally:
            self.active_streams -= 1
            if not req.done:  # client went away (cancel, disconnect, deadline): free its blocks
                rt.scheduler.cancel(req)
            if not ended:  # (the engine may have finished it just before: still not delivered)
                self._count_abandoned(context, name)

    # ---------------------------------------------------------------- Session

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.SessionResponse]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        CLIENT = object()

        async def read_client():
            try:
                async for msg in request_iterator:
                    q.put_nowait((CLIENT, msg))
            except Exception:  # cancelled / broken stream
                pass
            q.put_nowait((CLIENT, None))

        reader = asyncio.ensure_future(read_client())
        session = None
        rt = None
        entry = None
        md: tuple = ()
        conversation: list[dict] = []
        raw_history = False  # a text or token_ids turn was taken: no chat rendering from then on
        turn_req: sch.Request | None = None
        turn_id = ""
        turn_msgs: list[dict] | None = None
        state: StreamState | None = None
        self.active_streams += 1
        try:
            # ---- open
            src, first = await q.get()
            if first is None:
                return
            if first.WhichOneof("kind") != "open":
                await self._abort(context, _invalid("the first SessionRequest must be `open`"))
                return
            try:
                entry, rt = self._resolve(first.open.model)
                md = entry.deprecation_metadata()
                if md:
                    context.set_trailing_metadata(md)
                idle = first.open.idle_timeout_s or None
                if idle is not None and idle > MAX_IDLE_TIMEOUT_S:
                    raise _invalid(f"idle_timeout_s={idle} exceeds the limit of {MAX_IDLE_TIMEOUT_S} s")
                session = rt.scheduler.open_session(idle, owner=(loop, q))
            except Invalid as e:
                await self._abort(context, e, entry.name if entry else first.open.model, md)
                return
            except sch.QueueFull as e:
                await self._abort(context, Invalid(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)),
                                  entry.name, md)
                return
            except sch.SchedulerClosed as e:
                await self._abort(context, Invalid(grpc.StatusCode.UNAVAILABLE, str(e)), entry.name, md)
                return
            yield pb.SessionResponse(opened=pb.SessionOpened(
                session_id=session.session_id, model=entry.name,
                idle_timeout_s=int(session.idle_timeout_s)))
            cfg = rt.config

            # ---- turns (one runs at a time; turns sent meanwhile queue up, in order)
            def turn_error(tid: str, code: str, message: str) -> pb.SessionResponse:
                """A refused turn (or message): counted as a refused call would be."""
                self._count_error(entry.name, code)
                return pb.SessionResponse(turn_id=tid, error=pb.TurnError(code=code, message=message))

            pending: collections.deque = collections.deque()
            client_done = False

            async def start_turn(t: pb.Turn) -> pb.SessionResponse | None:
                """Validate and submit a turn; a SessionResponse carrying the error if refused."""
                nonlocal turn_req, turn_id, turn_msgs, state, raw_history
                arrival = time.monotonic_ns()
                try:
                    which = t.WhichOneof("input")
                    new_ids, new_msgs = await prompt_ids_off_loop(rt.tokenizer, cfg.vocab_size, which, t,
                                                                  cfg.context_length)
                    if new_msgs is not None and raw_history:
                        raise _invalid("messages: this session already holds text or token_ids turns, "
                                       "which a chat template cannot render; continue with text or "
                                       "token_ids turns, or open a new session for chat messages")
                    if new_msgs is not None:
                        full = rt.tokenizer.encode_chat(conversation + new_msgs, add_generation_prompt=True)
                        prompt, replace, total = full, True, len(full)
                    else:
                        prompt, replace = new_ids, False
                        total = len(session.tokens) + len(new_ids)
                    if total >= cfg.context_length:
                        raise _invalid(f"conversation of {total} tokens leaves no room to generate in the "
                                       f"model's context of {cfg.context_length} tokens (at most "
                                       f"{cfg.context_length - 1})")
                    params = sampling_params(t.sampling, vocab_size=cfg.vocab_size,
                                             context_length=cfg.context_length, prompt_len=total,
                                             kv_tokens=rt.kv_tokens)
                    coalesce = coalesce_of(t.coalesce_tokens)
                    check_id("turn_id", t.turn_id)
                except Invalid as e:
                    return turn_error(t.turn_id, e.code.name, e.message)
                req = sch.Request(prompt, params, request_id=f"{session.session_id}/{t.turn_id}",
                                  session=session,
                                  replace=replace, deadline_ns=self._deadline_ns(context),
                                  owner=(loop, q), arrival_ns=arrival)
                try:
                    rt.scheduler.submit(req)
                except (sch.QueueFull, sch.SchedulerClosed) as e:
                    code = "RESOURCE_EXHAUSTED" if isinstance(e, sch.QueueFull) else "UNAVAILABLE"
                    return turn_error(t.turn_id, code, str(e))
                turn_req, turn_id, turn_msgs = req, t.turn_id, new_msgs
                raw_history = raw_history or new_msgs is None
                # the cached count is known once the engine admits the turn (set at its first token)
                state = StreamState(entry.name, arrival, coalesce, self.server.metrics,
                                    rt.detokenizer(params),
                                    rt.emulator.stream(arrival, total, 0) if rt.emulator else None)
                return None

            def busy() -> bool:  # a turn is open until its final (or error) has been sent
                return state is not None

            while True:
                # start queued turns while idle (a refused one reports its error; try the next)
                while pending and not busy():
                    refused = await start_turn(pending.popleft())
                    if refused is not None:
                        yield refused
                if client_done and not busy():
                    return
                src, item = await q.get()
                if src is CLIENT:
                    if item is None:  # half-close: finish the running and queued turns, then end
                        client_done = True
                        continue
                    kind = item.WhichOneof("kind")
                    if kind == "close":
                        if turn_req is not None and not turn_req.done:
                            rt.scheduler.cancel(turn_req)
                        pending.clear()
                        yield pb.SessionResponse(turn_id=turn_id, closed=pb.SessionClosed(reason="client"))
                        return
                    if kind == "cancel":
                        tid = item.cancel.turn_id
                        queued = [t for t in pending if t.turn_id == tid] if tid else []
                        if queued:
                            pending.remove(queued[0])
                            if self.server.metrics is not None:
                                self.server.metrics.request_success.labels(
                                    entry.name, sch.FINISH_CANCELLED).inc()
                            yield pb.SessionResponse(turn_id=tid, final=pb.Final(
                                finish_reason=sch.FINISH_CANCELLED, usage=pb.Usage()))
                        elif busy() and not turn_req.done and (not tid or tid == turn_id):
                            rt.scheduler.cancel(turn_req)
                        continue
                    if kind != "turn":
                        what = f"`{kind}`" if kind else "an empty SessionRequest"
                        yield turn_error("", "INVALID_ARGUMENT",
                                         f"{what} in an open session; send a turn, cancel or close")
                        continue
                    if busy() or pending:
                        if len(pending) >= MAX_QUEUED_TURNS:
                            yield turn_error(item.turn.turn_id, "RESOURCE_EXHAUSTED",
                                             f"{len(pending)} turns already queued behind turn "
                                             f"{turn_id!r}; limit {MAX_QUEUED_TURNS}")
                        else:
                            pending.append(item.turn)
                        continue
                    refused = await start_turn(item.turn)
                    if refused is not None:
                        yield refused
                    continue

                req, ev = src, item
                if isinstance(ev, sch.SessionExpired):
                    yield pb.SessionResponse(turn_id=turn_id, closed=pb.SessionClosed(reason=ev.reason))
                    return
                if req is not turn_req or state is None:
                    continue  # a late event of a cancelled earlier turn
                if isinstance(ev, sch.TokenEvent):
                    if state.emu is not None and state.emu.n == 0 and req.seq is not None:
                        state.emu.cached_tokens = req.seq.stats.cached_tokens
                    c = state.add(ev)
                    if c is not None:
                        await state.before_send(c)
                        yield pb.SessionResponse(turn_id=turn_id, chunk=c)
                    continue
                # FinishEvent of the current turn
                code = _ERROR_FINISH.get(ev.reason)
                if code is not None and ev.reason != sch.FINISH_DEADLINE:
                    state = None
                    yield turn_error(turn_id, code.name, ev.error or ev.reason)
                    continue
                if ev.error and ev.reason == sch.FINISH_LENGTH and ev.stats.completion_tokens == 0:
                    state = None
                    yield turn_error(turn_id, "INVALID_ARGUMENT", ev.error)
                    continue
                c = state.flush(ev)
                if c is not None:
                    await state.before_send(c)
                    yield pb.SessionResponse(turn_id=turn_id, chunk=c)
                if turn_msgs is not None:
                    conversation.extend(turn_msgs)
                    conversation.append({"role": "assistant", "content": "".join(state.text)})
                final = state.final(ev)
                state = None
                if ev.reason == sch.FINISH_DEADLINE:  # counted now: the client may be gone already
                    self._count_error(entry.name, "DEADLINE_EXCEEDED")
                yield pb.SessionResponse(turn_id=turn_id, final=final)
                if ev.reason == sch.FINISH_DEADLINE:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "session deadline exceeded",
                                        trailing_metadata=md)
                    return
                if ev.reason == sch.FINISH_SHUTDOWN:
                    yield pb.SessionResponse(turn_id=turn_id, closed=pb.SessionClosed(reason="shutdown"))
                    return
        finally:
            self.active_streams -= 1
            reader.cancel()
            if rt is not None and session is not None:
                if turn_req is not None and not turn_req.done:
                    rt.scheduler.cancel(turn_req)
                if state is not None:  # a turn whose end the client did not get
                    self._count_abandoned(context, entry.name)
                rt.scheduler.close_session(session, "client")

    # ---------------------------------------------------------------- models

    def _model_info(self, entry: reg.ModelEntry) -> pb.ModelInfo:
        info = pb.ModelInfo(
            name=entry.name, aliases=list(entry.aliases),
            lifecycle=pb.Lifecycle(status=entry.effective_status(), sunset=entry.sunset,
                                   successor=entry.successor),
            emulate=self.server.emulate_target(entry),
            is_default=entry is self.server.registry.lookup(""),
        )
        rt = self.server.runtime_for(entry)
        if rt is not None and rt.is_ready:
            c = rt.config
            info.architecture = c.arch
            info.parameters = c.n_params
            info.quantization = c.quantization
            info.context_length = c.context_length
            info.vocab_size = c.vocab_size
            info.n_layers = c.n_layers
            info.d_model = c.d_model
            info.kv_pool_tokens = rt.kv_tokens
            info.loaded = True
        return info

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(e) for e in self.server.registry.entries])

    async def GetModel(self, request, context) -> pb.ModelInfo:
        try:
            entry = self.server.registry.lookup(request.name)
        except reg.UnknownModel as e:
            await self._abort(context, Invalid(grpc.StatusCode.NOT_FOUND, str(e)), request.name)
            return
        md = entry.deprecation_metadata()
        if md:
            context.set_trailing_metadata(md)
        return self._model_info(entry)

    async def Tokenize(self, request, context) -> pb.TokenizeResponse:
        md: tuple = ()
        try:
            entry, rt = self._resolve(request.model)
            md = entry.deprecation_metadata()
            if md:
                context.set_trailing_metadata(md)
            which = request.WhichOneof("input")
            ids, _ = await prompt_ids_off_loop(rt.tokenizer, rt.config.vocab_size, which, request,
                                               rt.config.context_length, inputs="messages or text")
            if len(ids) > rt.config.context_length:
                raise _invalid(f"{which}: prompt of {len(ids)} tokens is longer than the model's context "
                               f"of {rt.config.context_length} tokens")
        except Invalid as e:
            await self._abort(context, e, request.model, md)
            return
        tok = rt.tokenizer
        raw = [tok.token_bytes(i) for i in ids]
        pieces = [b.decode("utf-8", errors="replace") for b in raw]
        return pb.TokenizeResponse(ids=ids, pieces=pieces, piece_bytes=raw)
