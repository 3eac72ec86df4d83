"""The asyncio client: ``AsyncWaferClient`` and ``AsyncSession``, as the sync ones (grpc.aio)."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import grpc

from engine.client.connect import authorize, channel
from engine.client.wire import (Completion, SessionError, Token, _OpenTurn,
                                _session_items, _turn_request, belongs_to_abandoned, chunk_tokens,
                                final_completion, generate_request, tokenize_request)
from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc


class AsyncWaferClient:
    """``tls=True`` (the system's roots) or ``tls_ca`` (a PEM CA file) for TLS, ``tls_cert`` and
    ``tls_key`` for mutual TLS, ``token`` for a server asking a bearer token (engine.client.connect)."""

    def __init__(self, target: str, *, timeout: float | None = None, tls: bool = False,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 token: str | None = None):
        self.target = target
        self.timeout = timeout
        self.channel = channel(target, aio=True, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        self.stub = authorize(pb_grpc.WaferStub(self.channel), token)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **kw) -> AsyncIterator[Token | Completion]:
        call = self.stub.Generate(generate_request(prompt, **kw), timeout=timeout or self.timeout)
        try:
            tail = []
            async for resp in call:
                now = time.monotonic_ns()
                if resp.HasField("chunk"):
                    for t in chunk_tokens(resp.chunk, now, tail):
                        yield t
                else:
                    done = final_completion(resp.final, tail)
                    md = await call.trailing_metadata()
                    done.trailing_metadata = {k: v for k, v in (md or ())}
                    yield done
        finally:
            call.cancel()

    async def complete(self, prompt: str | None = None, **kw) -> tuple[str, Completion]:
        parts, done = [], None
        async for item in self.generate(prompt, **kw):
            if isinstance(item, Token):
                parts.append(item.text)
            else:
                done = item
        return "".join(parts) + (done.text if done else ""), done

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self.stub.ListModels(pb.ListModelsRequest(), timeout=10)).models)

    async def get_model(self, name: str) -> pb.ModelInfo:
        return await self.stub.GetModel(pb.GetModelRequest(name=name), timeout=10)

    async def tokenize(self, text: str | None = None, *, messages=None, model: str = "") -> list[int]:
        req = tokenize_request(text, messages=messages, model=model)
        return list((await self.stub.Tokenize(req, timeout=10)).ids)

    async def session(self, model: str = "", idle_timeout_s: int = 0) -> "AsyncSession":
        """``async with await client.session() as s: text, done = await s.say("hi")``"""
        s = AsyncSession(self, model, idle_timeout_s)
        await s._open()
        return s


class AsyncSession:
    def __init__(self, client: AsyncWaferClient, model: str = "", idle_timeout_s: int = 0):
        self._call = client.stub.Session(timeout=client.timeout)
        self._open_req = pb.SessionRequest(open=pb.SessionOpen(model=model, idle_timeout_s=idle_timeout_s))
        self._n = 0
        self._current: _OpenTurn | None = None
        self._abandoned: set[str] = set()
        self._tail: list[str] = []
        self._writing = asyncio.Lock()
        self.trailing_metadata: dict[str, str] = {}  # once closed
        self.session_id = ""
        self.model = ""
        self.closed_reason = ""

    async def _open(self) -> None:
        await self._call.write(self._open_req)
        first = await self._call.read()
        if first is grpc.aio.EOF:
            raise SessionError("CLOSED", "the server ended the session while opening it")
        self.session_id, self.model = first.opened.session_id, first.opened.model

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def turn(self, prompt: str | None = None, *, messages=None, token_ids=None, coalesce: int = 1,
                   turn_id: str | None = None, **sampling_kw) -> AsyncIterator[Token | Completion]:
        """As SyncSession.turn: a turn left early is cancelled (when the generator is closed, or
        at the latest when the next turn starts) and only ever yields its own tokens."""
        t = _turn_request(self, prompt, messages, token_ids, coalesce, turn_id, sampling_kw)
        await self._give_up_current()
        await self._write(pb.SessionRequest(turn=t))
        mine = self._current = _OpenTurn(t.turn_id)
        try:
            while self._current is mine:  # a later turn may have given this one up
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    self._current = None
                    raise SessionError("CLOSED", "the session stream ended")
                if belongs_to_abandoned(self._abandoned, resp):
                    continue
                items, done = _session_items(self, resp)
                for item in items:
                    yield item
                if done:
                    return
        finally:
            if self._current is mine:
                await self._give_up_current()

    async def _give_up_current(self) -> None:
        turn, self._current = self._current, None
        if turn is not None and self._call is not None:
            self._abandoned.add(turn.turn_id)
            try:  # best effort: the call may have ended (closed, or cancelled with a read)
                await self.cancel(turn.turn_id)
            except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass

    async def _write(self, req) -> None:
        async with self._writing:  # a generator closed by the loop may cancel while a turn writes
            await self._call.write(req)

    async def say(self, content: str, **kw) -> tuple[str, Completion]:
        parts, done = [], None
        async for item in self.turn(messages=[{"role": "user", "content": content}], **kw):
            if isinstance(item, Token):
                parts.append(item.text)
            else:
                done = item
        return "".join(parts) + (done.text if done else ""), done

    async def cancel(self, turn_id: str = "") -> None:
        await self._write(pb.SessionRequest(cancel=pb.CancelTurn(turn_id=turn_id)))

    async def close(self) -> None:
        if self._call is None:
            return
        try:
            await self._write(pb.SessionRequest(close=pb.CloseSession()))
            await self._call.done_writing()
            while (resp := await self._call.read()) is not grpc.aio.EOF:
                if resp.WhichOneof("kind") == "closed":
                    self.closed_reason = resp.closed.reason
            self.trailing_metadata = {k: v for k, v in (await self._call.trailing_metadata() or ())}
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass
        self._call = None
        self._current = None
        self._abandoned.clear()
