"""The blocking client: ``WaferClient`` (Generate, ListModels, GetModel, Tokenize) and
``SyncSession`` (a persistent conversation over one bidirectional Session stream)."""

from __future__ import annotations

import queue
import time
from typing import Iterator

import grpc

from engine.client.connect import authorize, channel
from engine.client.wire import (Completion, SessionError, Token, _md, _OpenTurn,
                                _session_items, _turn_request, belongs_to_abandoned, chunk_tokens,
                                final_completion, generate_request, tokenize_request)
from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc


class WaferClient:
    """``tls=True`` (the system's roots) or ``tls_ca`` (a PEM CA file) for TLS, ``tls_cert`` and
    ``tls_key`` for mutual TLS, ``token`` for a server asking a bearer token (engine.client.connect)."""

    def __init__(self, target: str, *, timeout: float | None = None, tls: bool = False,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 token: str | None = None):
        self.target = target
        self.timeout = timeout
        self.channel = channel(target, aio=False, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self.stub = authorize(pb_grpc.WaferStub(self.channel), token)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health check says SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="wafer.v1.Wafer"), timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout} s")
            time.sleep(0.1)

    def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                 request: pb.GenerateRequest | None = None, **kw) -> Iterator[Token | Completion]:
        """Yield Token objects as they stream, then one Completion (pass the keyword arguments
        of ``generate_request``, or a ready ``request``). Raises grpc.RpcError."""
        call = self.stub.Generate(request or generate_request(prompt, **kw), timeout=timeout or self.timeout)
        try:
            tail = []  # text of chunks without tokens (held back until the end)
            for resp in call:
                now = time.monotonic_ns()
                if resp.HasField("chunk"):
                    yield from chunk_tokens(resp.chunk, now, tail)
                else:
                    done = final_completion(resp.final, tail)
                    done.trailing_metadata = _md(call)
                    yield done
        finally:
            call.cancel()  # a consumer that stops early frees the server-side sequence

    def complete(self, prompt: str | None = None, **kw) -> tuple[str, Completion]:
        """The whole text and the Completion."""
        parts, done = [], None
        for item in self.generate(prompt, **kw):
            if isinstance(item, Token):
                parts.append(item.text)
            else:
                done = item
        return "".join(parts) + (done.text if done else ""), done

    def session(self, model: str = "", idle_timeout_s: int = 0) -> "SyncSession":
        return SyncSession(self, model, idle_timeout_s)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=10).models)

    def get_model(self, name: str) -> pb.ModelInfo:
        return self.stub.GetModel(pb.GetModelRequest(name=name), timeout=10)

    def tokenize(self, text: str | None = None, *, messages=None, model: str = "") -> list[int]:
        return list(self.stub.Tokenize(tokenize_request(text, messages=messages, model=model), timeout=10).ids)



class SyncSession:
    """A persistent conversation over one bidirectional stream."""

    def __init__(self, client: WaferClient, model: str = "", idle_timeout_s: int = 0):
        self._out: queue.Queue = queue.Queue()
        self._out.put(pb.SessionRequest(open=pb.SessionOpen(model=model, idle_timeout_s=idle_timeout_s)))
        self._call = client.stub.Session(iter(self._out.get, None), timeout=client.timeout)
        first = next(self._call)
        self.session_id = first.opened.session_id
        self.model = first.opened.model
        self._n = 0
        self._current: _OpenTurn | None = None  # the turn being read, until its final or error
        self._abandoned: set[str] = set()  # turns given up on whose end has not arrived yet
        self._tail: list[str] = []  # the current turn's text without tokens (see chunk_tokens)
        self.closed_reason = ""
        self.trailing_metadata: dict[str, str] = {}  # once closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def turn(self, prompt: str | None = None, *, messages=None, token_ids=None, coalesce: int = 1,
             turn_id: str | None = None, **sampling_kw) -> Iterator[Token | Completion]:
        """Send a turn and yield its tokens, then its Completion. Stopping early (``break``) or
        starting the next turn before this one ended cancels it; what the server still sends
        for it is skipped, so a turn only ever yields its own tokens."""
        t = _turn_request(self, prompt, messages, token_ids, coalesce, turn_id, sampling_kw)
        self._give_up_current()
        self._out.put(pb.SessionRequest(turn=t))
        mine = self._current = _OpenTurn(t.turn_id)
        try:
            while self._current is mine:  # a later turn may have given this one up
                resp = next(self._call, None)
                if resp is None:
                    raise SessionError("CLOSED", "the session stream ended")
                if belongs_to_abandoned(self._abandoned, resp):
                    continue
                items, done = _session_items(self, resp)
                yield from items
                if done:
                    return
        finally:
            if self._current is mine:
                self._give_up_current()

    def _give_up_current(self) -> None:
        turn, self._current = self._current, None
        if turn is not None:
            self._abandoned.add(turn.turn_id)
            self.cancel(turn.turn_id)

    def say(self, content: str, **kw) -> tuple[str, Completion]:
        """One chat turn (a user message); returns the reply text and its Completion."""
        parts, done = [], None
        for item in self.turn(messages=[{"role": "user", "content": content}], **kw):
            if isinstance(item, Token):
                parts.append(item.text)
            else:
                done = item
        return "".join(parts) + (done.text if done else ""), done

    def cancel(self, turn_id: str = "") -> None:
        self._out.put(pb.SessionRequest(cancel=pb.CancelTurn(turn_id=turn_id)))

    def close(self) -> None:
        if self._call is None:
            return
        self._out.put(pb.SessionRequest(close=pb.CloseSession()))
        self._out.put(None)
        try:
            for resp in self._call:
                if resp.WhichOneof("kind") == "closed":
                    self.closed_reason = resp.closed.reason
        except grpc.RpcError:
            pass
        self.trailing_metadata = _md(self._call)  # e.g. a deprecated model's
        self._call = None
        self._current = None
        self._abandoned.clear()
