"""The wafer.v1.Wafer gRPC servicer: thin RPC methods.

Requests are validated (engine.server.validate), turned into :class:`engine.scheduler.Request`
objects and handed to the model's scheduler; the engine's events come back through a per-call
asyncio queue (engine.server.publisher) and leave as messages (engine.server.stream). A Session
call is a :class:`engine.server.session_call.SessionCall`. The servicer knows nothing of Numba.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator

import grpc

from engine import scheduler as sch
from engine.server import registry as reg
from engine.server.parse import RateLimitedLog, Unparsable
from engine.server.session_call import SessionCall
from engine.server.stream import ERROR_FINISH, StreamState
from engine.server.validate import (Invalid, check_id, check_room, check_tokenizable, coalesce_of,
                                    prompt_ids_off_loop, sampling_params)
from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "wafer.v1.Wafer"
DEADLINE_SLACK_S = 0.05  # a call abandoned this close to its deadline counts as DEADLINE_EXCEEDED


def abandoned_status(time_remaining: float | None) -> str:
    """The status a client saw for a call that ended before its final. A client's own timer
    usually ends the call first, when the server's copy of the deadline still has a few
    milliseconds left (it started counting when the request arrived)."""
    if time_remaining is not None and time_remaining <= DEADLINE_SLACK_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


class WaferServicer(pb_grpc.WaferServicer):
    def __init__(self, server):
        self.server = server  # engine.server.app.WaferServer: registry, runtimes, metrics, draining
        self.active_streams = 0
        self._call_ids = itertools.count(1)  # names the calls that bring no request_id, in logs
        self.warn_unparsable = RateLimitedLog(log)

    # ---------------------------------------------------------------- helpers

    def resolve(self, name: str):
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

    def count_error(self, model_name: str, code: str) -> None:
        if self.server.metrics is not None:
            self.server.metrics.request_errors.labels(self.metric_label(model_name), code).inc()

    async def abort(self, context, e: Invalid, model_name: str = "", md=()) -> None:
        self.count_error(model_name, e.code.name)
        try:
            await context.abort(e.code, e.message, trailing_metadata=tuple(md) + tuple(e.md))
        except grpc.aio.AbortError:  # how abort ends the call
            raise
        except Exception:
            if not context.done():
                raise
            # the call ended meanwhile (its deadline): nothing to send, and no traceback in the
            # log for it (gRPC logs one at ERROR when a handler lets this escape)

    async def refuse_unparsable(self, request: Unparsable, context) -> None:
        """A unary request whose bytes did not parse (engine.server.parse): INVALID_ARGUMENT
        naming the message, one WARNING line at most a minute, counted under model "unknown"
        (its model field could not be read)."""
        self.note_unparsable(request, context)
        if self.server.metrics is not None:
            self.server.metrics.request_errors.labels("unknown", "INVALID_ARGUMENT").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    def note_unparsable(self, request: Unparsable, context) -> None:
        self.warn_unparsable("refused a request from %s: %s", context.peer(), request.message)

    def count_abandoned(self, context, model_name: str) -> None:
        """A request whose call ended before its final (gRPC's own deadline, a cancel, a
        disconnect) is counted as an error under the status the client saw."""
        if self.server.metrics is None:
            return
        self.count_error(model_name, abandoned_status(context.time_remaining()))

    def metric_label(self, name: str) -> str:
        """A model's registry name for a metric label: a name no model has is "unknown", so
        clients cannot create label values (time series) at will."""
        try:
            return self.server.registry.lookup(name).name
        except reg.UnknownModel:
            return "unknown"

    def deadline_ns(self, context) -> int | None:
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
            entry, rt = self.resolve(request.model)
            name = entry.name
            md = entry.deprecation_metadata()
            if md:
                context.set_trailing_metadata(md)
            cfg = rt.config
            which = request.WhichOneof("input")
            ids, _ = await prompt_ids_off_loop(rt.tokenizer, cfg.vocab_size, which, request, cfg.context_length)
            check_room(f"{which}: prompt", len(ids), cfg.context_length)
            params = sampling_params(request.sampling, vocab_size=cfg.vocab_size,
                                     context_length=cfg.context_length, prompt_len=len(ids),
                                     kv_tokens=rt.kv_tokens)
            coalesce = coalesce_of(request.coalesce_tokens)
            check_id("request_id", request.request_id)
        except Invalid as e:
            await self.abort(context, e, name, md)
            return

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = sch.Request(ids, params, request_id=request.request_id or f"g{next(self._call_ids)}",
                          deadline_ns=self.deadline_ns(context), owner=(loop, q), arrival_ns=arrival)
        try:
            rt.scheduler.submit(req)
        except sch.QueueFull as e:
            await self.abort(context, Invalid(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)), name, md)
            return
        except sch.SchedulerClosed as e:
            await self.abort(context, Invalid(grpc.StatusCode.UNAVAILABLE, str(e)), name, md)
            return

        state = StreamState(name, arrival, coalesce, self.server.metrics, rt.detokenizer(params),
                            rt.emulator.stream(arrival, len(ids), 0) if rt.emulator else None)
        self.active_streams += 1
        ended = False  # the call's end (final or error status) was handed to gRPC
        try:
            while True:
                _, ev = await q.get()
                if isinstance(ev, sch.TokenEvent):
                    if state.emu is not None and state.emu.n == 0 and req.seq is not None:
                        state.emu.cached_tokens = req.seq.stats.cached_tokens  # the prefix cache's hit
                    c = state.add(ev)
                    if c is not None:
                        await state.before_send(c)
                        yield pb.GenerateResponse(chunk=c)
                    continue
                # FinishEvent
                code = ERROR_FINISH.get(ev.reason)
                if code is not None:
                    ended = True
                    await self.abort(context, Invalid(code, ev.error or f"request {ev.reason}"), name, md)
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
                self.count_abandoned(context, name)

    # ---------------------------------------------------------------- Session

    async def Session(self, request_iterator, context) -> AsyncIterator[pb.SessionResponse]:
        async for resp in SessionCall(self, request_iterator, context).run():
            yield resp

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
            info.numerics = rt.model.numerics
            info.int8_kernel = rt.model.int8_kernel
            info.loaded = True
        return info

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(e) for e in self.server.registry.entries])

    async def GetModel(self, request, context) -> pb.ModelInfo:
        try:
            entry = self.server.registry.lookup(request.name)
        except reg.UnknownModel as e:
            await self.abort(context, Invalid(grpc.StatusCode.NOT_FOUND, str(e)), request.name)
            return
        md = entry.deprecation_metadata()
        if md:
            context.set_trailing_metadata(md)
        return self._model_info(entry)

    async def Tokenize(self, request, context) -> pb.TokenizeResponse:
        md: tuple = ()
        try:
            entry, rt = self.resolve(request.model)
            md = entry.deprecation_metadata()
            if md:
                context.set_trailing_metadata(md)
            which = request.WhichOneof("input")
            ids, _ = await prompt_ids_off_loop(rt.tokenizer, rt.config.vocab_size, which, request,
                                               rt.config.context_length, inputs="messages or text")
            check_tokenizable(which, len(ids), rt.config.context_length)
        except Invalid as e:
            await self.abort(context, e, request.model, md)
            return
        tok = rt.tokenizer
        raw = [tok.token_bytes(i) for i in ids]
        pieces = [b.decode("utf-8", errors="replace") for b in raw]
        return pb.TokenizeResponse(ids=ids, pieces=pieces, piece_bytes=raw)
