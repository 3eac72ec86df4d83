"""Request bytes -> messages, without letting a bad message reach gRPC's own error path.

gRPC runs a method's request deserializer before the handler: a ``DecodeError`` there (a string
field holding invalid UTF-8, a corrupt wire format) ends the call with status UNKNOWN and grpc
logs an ERROR with a traceback, per request, uncounted. So the Wafer service is registered (from
the generated stubs' own method handlers) with deserializers that never raise: a message that
fails to parse reaches the handler as an :class:`Unparsable`, and

- a unary request (Generate, ListModels, GetModel, Tokenize) is refused by a guard around the
  servicer's method: INVALID_ARGUMENT naming the message, before the method runs;
- a Session message is handed to the session (engine.server.session_call), which answers it with
  a TurnError and goes on.

``refuse(unparsable, context)`` (the servicer's) logs, counts and aborts.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from protos import wafer_pb2_grpc as pb_grpc

SERVICE = "wafer.v1.Wafer"

# upb's reasons, as a client can act on them
_REASONS = {
    "String field had bad UTF-8": "invalid UTF-8 in a string field (proto3 strings must be UTF-8)",
    "Wire format was corrupt": "the wire format is corrupt",
}


class Unparsable:
    """What a request deserializer returns for bytes that are not a valid ``type_name``."""

    __slots__ = ("type_name", "reason")

    def __init__(self, type_name: str, reason: str):
        self.type_name = type_name
        self.reason = reason

    @property
    def message(self) -> str:
        """The status message: names the message that failed and why."""
        return f"request: {self.type_name} failed to parse: {self.reason}"


def tolerant(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """A request deserializer (``Message.FromString``) that returns an Unparsable instead of
    raising."""
    type_name = parse.__self__.DESCRIPTOR.name

    def deserialize(data: bytes):
        try:
            return parse(data)
        except DecodeError as e:
            detail = str(e).rpartition("': ")[2] or str(e)
            return Unparsable(type_name, _REASONS.get(detail, detail))

    return deserialize


def _guard_unary(behavior, refuse):
    async def guarded(request, context):
        if type(request) is Unparsable:
            return await refuse(request, context)
        return await behavior(request, context)
    return guarded


def _guard_unary_stream(behavior, refuse):
    async def guarded(request, context):
        if type(request) is Unparsable:
            await refuse(request, context)
            return
        async for resp in behavior(request, context):
            yield resp
    return guarded


def wafer_method_handlers(servicer, refuse) -> dict[str, grpc.RpcMethodHandler]:
    """The generated ``add_WaferServicer_to_server``'s method handlers, with tolerant request
    deserializers and the unary requests' methods guarded by ``refuse``."""
    captured: dict[str, grpc.RpcMethodHandler] = {}

    class Recorder:  # what add_WaferServicer_to_server registers, captured instead
        def add_generic_rpc_handlers(self, handlers):
            pass

        def add_registered_method_handlers(self, service, handlers):
            assert service == SERVICE
            captured.update(handlers)

    pb_grpc.add_WaferServicer_to_server(servicer, Recorder())
    out = {}
    for name, h in captured.items():
        h = h._replace(request_deserializer=tolerant(h.request_deserializer))
        if h.unary_unary is not None:
            h = h._replace(unary_unary=_guard_unary(h.unary_unary, refuse))
        elif h.unary_stream is not None:
            h = h._replace(unary_stream=_guard_unary_stream(h.unary_stream, refuse))
        # streamed requests (Session) meet their Unparsable messages one by one
        out[name] = h
    return out


def add_wafer_service(servicer, server, refuse) -> None:
    """``add_WaferServicer_to_server`` with the handlers above."""
    handlers = wafer_method_handlers(servicer, refuse)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class RateLimitedLog:
    """At most one record per ``interval_s``; the next one says how many were left out. For
    what a client can cause once per request (a log line each would flood the log)."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING, interval_s: float = 60.0):
        self.logger = logger
        self.level = level
        self.interval_s = interval_s
        self._next = 0.0
        self._skipped = 0

    def __call__(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            msg += f" ({self._skipped} more like it in the last {self.interval_s:.0f} s not logged)"
        self._skipped = 0
        self._next = now + self.interval_s
        self.logger.log(self.level, msg, *args)
