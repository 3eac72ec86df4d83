"""One Session RPC: a conversation whose KV stays on the engine between turns.

The call reads two sources through one queue: the client's SessionRequests (``open``, then
``turn`` / ``cancel`` / ``close``) and the engine's events for the running turn. One turn runs at
a time; turns sent meanwhile wait in order (up to MAX_QUEUED_TURNS). A refused turn, a misplaced
message or one that failed to parse is a TurnError and the session goes on; the session ends on
``close`` (the running turn's final, then the queued turns' finals, all "cancelled", then
``closed``), half-close (after the queued turns), idle expiry, shutdown, or the call's deadline
(the turn's final, then DEADLINE_EXCEEDED). Every turn accepted gets one Final or TurnError.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import AsyncIterator

import grpc

from engine import scheduler as sch
from engine.server.parse import Unparsable
from engine.server.stream import ERROR_FINISH, StreamState
from engine.server.validate import (Invalid, check_id, check_room, coalesce_of, idle_timeout_of, invalid,
                                    prompt_ids_off_loop, sampling_params)
from protos import wafer_pb2 as pb

MAX_QUEUED_TURNS = 4  # session turns sent while one runs wait in order, up to this many

CLIENT = object()  # the source of client messages in the call's queue (engine events carry their request)

log = logging.getLogger(__name__)


class SessionCall:
    """The state of one Session call; ``run()`` is the RPC's response stream."""

    def __init__(self, servicer, request_iterator, context):
        self.servicer = servicer  # engine.server.servicer.WaferServicer: resolve, abort, counting
        self.requests = request_iterator
        self.context = context
        self.queue: asyncio.Queue = asyncio.Queue()  # (CLIENT, msg | None) and (request, event)
        self.loop: asyncio.AbstractEventLoop | None = None
        # the session, once open
        self.entry = None
        self.rt = None
        self.md: tuple = ()  # trailing metadata (a deprecated model's)
        self.session: sch.Session | None = None
        self.conversation: list[dict] = []  # chat messages so far, replies included
        self.raw_history = False  # a text or token_ids turn was taken: no chat rendering from then on
        self.pending: collections.deque = collections.deque()  # turns waiting for the running one
        self.client_done = False  # the client half-closed: end once the turns are done
        self.closing = False  # the client sent `close`: finals for the running and queued turns, then `closed`
        self.last_turn_id = ""  # of the last Turn message read: what `closed` names
        self.ended = False  # the call's response stream is over
        # the running turn: open until its final (or error) has been sent
        self.turn_req: sch.Request | None = None
        self.turn_id = ""
        self.turn_msgs: list[dict] | None = None
        self.state: StreamState | None = None

    @property
    def busy(self) -> bool:
        return self.state is not None

    async def run(self) -> AsyncIterator[pb.SessionResponse]:
        self.loop = asyncio.get_running_loop()
        reader = asyncio.ensure_future(self._read_client())
        self.servicer.active_streams += 1
        try:
            opened = await self._open()
            if opened is None:
                return
            yield opened
            while True:
                if self.closing and not self.busy:  # the running turn's final was sent
                    for t in self.pending:
                        yield self._cancelled_queued(t.turn_id)
                    self.pending.clear()
                    yield pb.SessionResponse(turn_id=self.last_turn_id,
                                             closed=pb.SessionClosed(reason="client"))
                    return
                # start queued turns while idle (a refused one reports its error; try the next)
                while self.pending and not self.busy and not self.closing:
                    refused = await self._start_turn(self.pending.popleft())
                    if refused is not None:
                        yield refused
                if self.client_done and not self.busy and not self.closing:
                    return
                src, item = await self.queue.get()
                handler = self._on_client(item) if src is CLIENT else self._on_engine(src, item)
                async for resp in handler:
                    yield resp
                if self.ended:
                    return
        finally:
            self.servicer.active_streams -= 1
            reader.cancel()
            self._cleanup()

    async def _read_client(self) -> None:
        """Client messages into the queue (an Unparsable for one that failed to parse), then
        None (half-close), or the exception that ended reading."""
        try:
            async for msg in self.requests:
                self.queue.put_nowait((CLIENT, msg))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - reported by the session, not taken for a half-close
            self.queue.put_nowait((CLIENT, e))
            return
        self.queue.put_nowait((CLIENT, None))

    def _cleanup(self) -> None:
        if self.rt is None or self.session is None:
            return
        if self.turn_req is not None and not self.turn_req.done:
            self.rt.scheduler.cancel(self.turn_req)
        if self.state is not None:  # a turn whose end the client did not get
            self.servicer.count_abandoned(self.context, self.entry.name)
        self.rt.scheduler.close_session(self.session, "client")

    # ---------------------------------------------------------------- open

    async def _open(self) -> pb.SessionResponse | None:
        """The ``opened`` response, or None when the call ended (refused, or the client left)."""
        _, first = await self.queue.get()
        if first is None:
            return None
        sv = self.servicer
        if isinstance(first, Exception):
            await self._read_failed(first)
            return None
        if type(first) is Unparsable:
            await sv.refuse_unparsable(first, self.context)
            return None
        if first.WhichOneof("kind") != "open":
            await sv.abort(self.context, invalid("the first SessionRequest must be `open`"))
            return None
        try:
            self.entry, self.rt = sv.resolve(first.open.model)
            self.md = self.entry.deprecation_metadata()
            if self.md:
                self.context.set_trailing_metadata(self.md)
            idle = idle_timeout_of(first.open.idle_timeout_s)
            self.session = self.rt.scheduler.open_session(idle, owner=(self.loop, self.queue))
        except Invalid as e:
            await sv.abort(self.context, e, self.entry.name if self.entry else first.open.model, self.md)
            return None
        except sch.QueueFull as e:
            await sv.abort(self.context, Invalid(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)),
                           self.entry.name, self.md)
            return None
        except sch.SchedulerClosed as e:
            await sv.abort(self.context, Invalid(grpc.StatusCode.UNAVAILABLE, str(e)), self.entry.name,
                           self.md)
            return None
        return pb.SessionResponse(opened=pb.SessionOpened(
            session_id=self.session.session_id, model=self.entry.name,
            idle_timeout_s=int(self.session.idle_timeout_s)))

    # ---------------------------------------------------------------- turns

    def _turn_error(self, tid: str, code: str, message: str) -> pb.SessionResponse:
        """A refused turn (or message): counted as a refused call would be."""
        self.servicer.count_error(self.entry.name, code)
        return pb.SessionResponse(turn_id=tid, error=pb.TurnError(code=code, message=message))

    async def _start_turn(self, t: pb.Turn) -> pb.SessionResponse | None:
        """Validate and submit a turn; a SessionResponse carrying the error if refused."""
        rt, cfg = self.rt, self.rt.config
        arrival = time.monotonic_ns()
        try:
            which = t.WhichOneof("input")
            new_ids, new_msgs = await prompt_ids_off_loop(rt.tokenizer, cfg.vocab_size, which, t,
                                                          cfg.context_length)
            if new_msgs is not None and self.raw_history:
                raise invalid("messages: this session already holds text or token_ids turns, "
                              "which a chat template cannot render; continue with text or "
                              "token_ids turns, or open a new session for chat messages")
            if new_msgs is not None:
                full = rt.tokenizer.encode_chat(self.conversation + new_msgs, add_generation_prompt=True)
                prompt, replace, total = full, True, len(full)
            else:
                prompt, replace = new_ids, False
                total = len(self.session.tokens) + len(new_ids)
            check_room("conversation", total, cfg.context_length)
            params = sampling_params(t.sampling, vocab_size=cfg.vocab_size,
                                     context_length=cfg.context_length, prompt_len=total,
                                     kv_tokens=rt.kv_tokens)
            coalesce = coalesce_of(t.coalesce_tokens)
            check_id("turn_id", t.turn_id)
        except Invalid as e:
            return self._turn_error(t.turn_id, e.code.name, e.message)
        req = sch.Request(prompt, params, request_id=f"{self.session.session_id}/{t.turn_id}",
                          session=self.session, replace=replace,
                          deadline_ns=self.servicer.deadline_ns(self.context),
                          owner=(self.loop, self.queue), arrival_ns=arrival)
        try:
            rt.scheduler.submit(req)
        except (sch.QueueFull, sch.SchedulerClosed) as e:
            code = "RESOURCE_EXHAUSTED" if isinstance(e, sch.QueueFull) else "UNAVAILABLE"
            return self._turn_error(t.turn_id, code, str(e))
        self.turn_req, self.turn_id, self.turn_msgs = req, t.turn_id, new_msgs
        self.raw_history = self.raw_history or new_msgs is None
        # the cached count is known once the engine admits the turn (set at its first token)
        self.state = StreamState(self.entry.name, arrival, coalesce, self.servicer.server.metrics,
                                 rt.detokenizer(params),
                                 rt.emulator.stream(arrival, total, 0) if rt.emulator else None)
        return None

    # ---------------------------------------------------------------- client messages

    async def _read_failed(self, e: Exception) -> None:
        """Reading the client's stream raised (not a half-close): end the call with a status."""
        log.warning("session %s: reading the client's messages failed: %r",
                    self.session.session_id if self.session else "(not open)", e)
        self.ended = True
        await self.servicer.abort(self.context, Invalid(grpc.StatusCode.INTERNAL,
                                                        f"reading the session's requests failed: {e!r}"),
                                  self.entry.name if self.entry else "", self.md)

    async def _on_client(self, msg) -> AsyncIterator[pb.SessionResponse]:
        if self.closing:  # after `close`, nothing the client sends matters
            return
        if msg is None:  # half-close: finish the running and queued turns, then end
            self.client_done = True
            return
        if isinstance(msg, Exception):
            await self._read_failed(msg)
            return
        if type(msg) is Unparsable:  # its turn_id (if a turn) cannot be read: reply with ""
            self.servicer.note_unparsable(msg, self.context)
            yield self._turn_error("", "INVALID_ARGUMENT", f"{msg.message}; the message was dropped, "
                                                           f"the session goes on")
            return
        kind = msg.WhichOneof("kind")
        if kind == "turn":
            self.last_turn_id = msg.turn.turn_id
        if kind == "close":
            # the running turn ends with its final ("cancelled" unless it finished meanwhile),
            # then the queued turns' finals and `closed` (run's loop, once it is not busy)
            self.closing = True
            if self.busy and not self.turn_req.done:
                self.rt.scheduler.cancel(self.turn_req)
        elif kind == "cancel":
            async for resp in self._cancel(msg.cancel.turn_id):
                yield resp
        elif kind != "turn":
            what = f"`{kind}`" if kind else "an empty SessionRequest"
            yield self._turn_error("", "INVALID_ARGUMENT",
                                   f"{what} in an open session; send a turn, cancel or close")
        elif self.busy or self.pending:
            if len(self.pending) >= MAX_QUEUED_TURNS:
                yield self._turn_error(msg.turn.turn_id, "RESOURCE_EXHAUSTED",
                                       f"{len(self.pending)} turns already queued behind turn "
                                       f"{self.turn_id!r}; limit {MAX_QUEUED_TURNS}")
            else:
                self.pending.append(msg.turn)
        else:
            refused = await self._start_turn(msg.turn)
            if refused is not None:
                yield refused

    async def _cancel(self, tid: str) -> AsyncIterator[pb.SessionResponse]:
        """Cancel a queued turn (its final at once) or the running one (its final comes from the
        engine); no turn id: the running one."""
        queued = [t for t in self.pending if t.turn_id == tid] if tid else []
        if queued:
            self.pending.remove(queued[0])
            yield self._cancelled_queued(tid)
        elif self.busy and not self.turn_req.done and (not tid or tid == self.turn_id):
            self.rt.scheduler.cancel(self.turn_req)

    def _cancelled_queued(self, tid: str) -> pb.SessionResponse:
        """The final of a turn cancelled before it started: usage all 0."""
        metrics = self.servicer.server.metrics
        if metrics is not None:
            metrics.request_success.labels(self.entry.name, sch.FINISH_CANCELLED).inc()
        return pb.SessionResponse(turn_id=tid, final=pb.Final(finish_reason=sch.FINISH_CANCELLED,
                                                              usage=pb.Usage()))

    # ---------------------------------------------------------------- engine events

    async def _on_engine(self, req, ev) -> AsyncIterator[pb.SessionResponse]:
        state = self.state
        if isinstance(ev, sch.SessionExpired):
            self.ended = True
            yield pb.SessionResponse(turn_id=self.last_turn_id, closed=pb.SessionClosed(reason=ev.reason))
            return
        if req is not self.turn_req or state is None:
            return  # a late event of a cancelled earlier turn
        if isinstance(ev, sch.TokenEvent):
            if state.emu is not None and state.emu.n == 0 and req.seq is not None:
                state.emu.cached_tokens = req.seq.stats.cached_tokens
            c = state.add(ev)
            if c is not None:
                await state.before_send(c)
                yield pb.SessionResponse(turn_id=self.turn_id, chunk=c)
            return
        async for resp in self._on_finish(ev):
            yield resp

    async def _on_finish(self, ev: sch.FinishEvent) -> AsyncIterator[pb.SessionResponse]:
        """The running turn's end: its last chunk and final, or a TurnError; a deadline then ends
        the call (DEADLINE_EXCEEDED), a shutdown closes the session."""
        state, tid = self.state, self.turn_id
        code = ERROR_FINISH.get(ev.reason)
        if code is not None and ev.reason != sch.FINISH_DEADLINE:
            self.state = None
            yield self._turn_error(tid, code.name, ev.error or ev.reason)
            return
        if ev.error and ev.reason == sch.FINISH_LENGTH and ev.stats.completion_tokens == 0:
            self.state = None
            yield self._turn_error(tid, "INVALID_ARGUMENT", ev.error)
            return
        c = state.flush(ev)
        if c is not None:
            await state.before_send(c)
            yield pb.SessionResponse(turn_id=tid, chunk=c)
        if self.turn_msgs is not None:
            self.conversation.extend(self.turn_msgs)
            self.conversation.append({"role": "assistant", "content": "".join(state.text)})
        final = state.final(ev)
        self.state = None
        if ev.reason == sch.FINISH_DEADLINE:  # counted now: the client may be gone already
            self.servicer.count_error(self.entry.name, "DEADLINE_EXCEEDED")
        yield pb.SessionResponse(turn_id=tid, final=final)
        if ev.reason == sch.FINISH_DEADLINE:
            self.ended = True
            await self.context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "session deadline exceeded",
                                     trailing_metadata=self.md)
        elif ev.reason == sch.FINISH_SHUTDOWN:
            self.ended = True
            yield pb.SessionResponse(turn_id=self.last_turn_id, closed=pb.SessionClosed(reason="shutdown"))
