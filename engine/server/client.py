"""Python clients for `wafer serve` (sync and asyncio): stream tokens, then the final usage.

    from engine.server.client import WaferClient
    with WaferClient("127.0.0.1:50051") as c:
        for item in c.generate("What is the capital of France?", max_tokens=32, temperature=0):
            if isinstance(item, Token):
                print(item.text, end="", flush=True)
            else:                      # Completion: finish_reason, usage, emulation
                print("\\n", item.usage)

    async with AsyncWaferClient("127.0.0.1:50051") as c:
        async for item in c.generate(messages=[{"role": "user", "content": "Hi"}]):
            ...

Sessions keep the conversation's KV cache on the server between turns::

    with c.session() as s:
        text, done = s.say("My name is Ada.")
        text, done = s.say("What is my name?")    # done.usage["cached_tokens"] > 0
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import grpc
from google.protobuf.descriptor import FieldDescriptor

from protos import wafer_pb2 as pb
from protos import wafer_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class Token:
    id: int
    text: str                 # text delta released with this token ("" while held back)
    index: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    engine_step_ns: int = 0
    batch_size: int = 0
    sim_time_us: int | None = None
    late_us: int | None = None
    received_ns: int = 0      # client monotonic time the message arrived


@dataclass
class Completion:
    finish_reason: str
    usage: dict[str, Any]
    emulation: dict[str, Any] | None = None
    text: str = ""            # text that came after the last token (held-back stop prefix)
    trailing_metadata: dict[str, str] = field(default_factory=dict)


def _usage(u: pb.Usage) -> dict[str, Any]:
    return {f.name: getattr(u, f.name) for f in u.DESCRIPTOR.fields}


def _final(f: pb.Final, tail: list[str]) -> Completion:
    emu = None
    if f.HasField("emulation"):
        emu = {fd.name: getattr(f.emulation, fd.name) for fd in f.emulation.DESCRIPTOR.fields}
    text = "".join(tail)
    tail.clear()
    return Completion(f.finish_reason, _usage(f.usage), emu, text)


def _tokens(c: pb.TokenChunk, received_ns: int, tail: list[str]) -> list[Token]:
    """Split a chunk into tokens; the chunk's text goes with its last token, or to ``tail`` (the
    Completion's text) when the chunk has no token."""
    n = len(c.token_ids)
    if n == 0 and c.text:
        tail.append(c.text)
    out = []
    for i, tid in enumerate(c.token_ids):
        t = Token(tid, c.text if i == n - 1 else "", c.index + i, engine_step_ns=c.engine_step_ns,
                  batch_size=c.batch_size, received_ns=received_ns)
        if i < len(c.logprobs):
            t.logprob = c.logprobs[i].logprob
            t.top_logprobs = [(x.id, x.logprob) for x in c.logprobs[i].top]
        if i < len(c.sim_time_us):
            t.sim_time_us = c.sim_time_us[i]
        if i < len(c.late_us):
            t.late_us = c.late_us[i]
        out.append(t)
    return out


_INT_RANGES = {
    FieldDescriptor.TYPE_UINT32: "[0, 2^32)", FieldDescriptor.TYPE_UINT64: "[0, 2^64)",
    FieldDescriptor.TYPE_INT32: "[-2^31, 2^31)", FieldDescriptor.TYPE_INT64: "[-2^63, 2^63)",
}


def sampling(**kw) -> pb.SamplingParams:
    """Build SamplingParams from keyword arguments; None leaves a field at the server default.
    A value the field's type cannot hold raises ValueError naming the field and its range (the
    server checks the rest)."""
    sp = pb.SamplingParams()
    for k, v in kw.items():
        if k not in sp.DESCRIPTOR.fields_by_name:
            raise TypeError(f"{k}= is not a sampling parameter (those are "
                            f"{', '.join(sp.DESCRIPTOR.fields_by_name)}); raw text is the first "
                            f"argument, chat input messages=, ids token_ids=")
        if v is None:
            continue
        try:
            if k in ("stop", "stop_token_ids"):
                getattr(sp, k).extend(v)
            else:
                setattr(sp, k, v)
        except (ValueError, TypeError) as e:
            field = sp.DESCRIPTOR.fields_by_name[k]
            limit = _INT_RANGES.get(field.type)
            raise ValueError(f"{k}={v!r} must be in {limit}" if limit else f"{k}={v!r}: {e}") from None
    return sp


def _input(msg, prompt=None, messages=None, token_ids=None) -> None:
    if messages is not None:
        msg.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif token_ids is not None:
        msg.token_ids.ids.extend(token_ids)
    elif prompt is not None:
        msg.text = prompt


def generate_request(prompt: str | None = None, *, messages: list[dict] | None = None,
                     token_ids: list[int] | None = None, model: str = "", coalesce: int = 1,
                     request_id: str = "", **sampling_kw) -> pb.GenerateRequest:
    """``prompt`` is raw text (no chat template); pass ``messages`` for chat."""
    req = pb.GenerateRequest(model=model, coalesce_tokens=coalesce, request_id=request_id,
                             sampling=sampling(**sampling_kw))
    _input(req, prompt, messages, token_ids)
    return req


def _md(call) -> dict[str, str]:
    try:
        return {k: v for k, v in (call.trailing_metadata() or ())}
    except Exception:
        return {}


# ------------------------------------------------------------------------------- sync


class WaferClient:
    def __init__(self, target: str, *, timeout: float | None = None):
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.WaferStub(self.channel)

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
                    yield from _tokens(resp.chunk, now, tail)
                else:
                    done = _final(resp.final, tail)
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
        req = pb.TokenizeRequest(model=model)
        _input(req, text, messages)
        return list(self.stub.Tokenize(req, timeout=10).ids)


class SessionError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(eq=False)
class _OpenTurn:
    """The turn a session is reading; compared by identity (turn ids may repeat)."""
    turn_id: str


def _turn_request(session, prompt, messages, token_ids, coalesce, turn_id, sampling_kw) -> pb.Turn:
    session._n += 1
    t = pb.Turn(turn_id=turn_id or f"t{session._n}", coalesce_tokens=coalesce,
                sampling=sampling(**sampling_kw))
    _input(t, prompt, messages, token_ids)
    return t


def _belongs_to_abandoned(session, resp) -> bool:
    """Whether a Session response is what is left of a turn the client gave up on (skipped; a
    session-wide `closed` is never skipped, whichever turn it names)."""
    kind = resp.WhichOneof("kind")
    if resp.turn_id not in session._abandoned or kind == "closed":
        return False
    if kind in ("final", "error"):  # that turn has ended
        session._abandoned.discard(resp.turn_id)
    return True


def _session_items(session, resp) -> tuple[list, bool]:
    """What one Session response means for the turn in progress: its tokens, or its final
    Completion (done=True); an error or a server-side close ends the turn and raises
    SessionError."""
    kind = resp.WhichOneof("kind")
    if kind == "chunk":
        return _tokens(resp.chunk, time.monotonic_ns(), session._tail), False
    if kind in ("final", "error", "closed"):
        session._current = None
    if kind == "final":
        return [_final(resp.final, session._tail)], True
    if kind == "error":
        raise SessionError(resp.error.code, resp.error.message)
    if kind == "closed":
        session.closed_reason = resp.closed.reason
        raise SessionError("CLOSED", f"session closed by the server ({resp.closed.reason})")
    return [], False


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
        self._tail: list[str] = []  # the current turn's text without tokens (see _tokens)
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
                if _belongs_to_abandoned(self, resp):
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


# ------------------------------------------------------------------------------- asyncio


class AsyncWaferClient:
    def __init__(self, target: str, *, timeout: float | None = None):
        self.target = target
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.WaferStub(self.channel)

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
                    for t in _tokens(resp.chunk, now, tail):
                        yield t
                else:
                    done = _final(resp.final, tail)
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
        req = pb.TokenizeRequest(model=model)
        _input(req, text, messages)
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
                if _belongs_to_abandoned(self, resp):
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


# ------------------------------------------------------------------------------- CLI glue


def deprecation_warning(md: dict[str, str], model: str) -> str | None:
    """The warning a CLI prints for a deprecated model's metadata, or None."""
    if md.get("wafer-deprecated") != "true":
        return None
    msg = f"warning: model {model!r} is deprecated" if model else "warning: the server's default model is deprecated"
    if md.get("wafer-sunset"):
        msg += f" and retires on {md['wafer-sunset']}"
    if md.get("wafer-successor"):
        msg += f"; use {md['wafer-successor']!r}"
    return msg


def generate_cli_remote(args) -> int:
    """`wafer generate --server HOST:PORT ...`: same output as the local mode."""
    from engine.generate_cli import emit, emit_summary

    kw = dict(model=args.model or "", max_tokens=args.max_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              min_p=getattr(args, "min_p", None),
              repetition_penalty=getattr(args, "repetition_penalty", None), seed=args.seed,
              stop=list(getattr(args, "stop", []) or []))
    if args.raw:
        kw["prompt"] = args.prompt
    else:
        kw["messages"] = [{"role": "user", "content": args.prompt}]
    try:
        request = generate_request(**kw)
    except ValueError as e:  # a value the request's field cannot hold
        print(f"wafer generate: error: {e}", file=sys.stderr)
        return 2
    try:
        with WaferClient(args.server) as client:
            for item in client.generate(request=request):
                if isinstance(item, Token):
                    emulated = item.sim_time_us is not None
                    emit(args, item.id, item.text,
                         {"sim_time_us": item.sim_time_us, "late_us": item.late_us} if emulated else None)
                else:
                    if item.text and not args.json:
                        sys.stdout.write(item.text)
                    u = item.usage
                    n = u["completion_tokens"]
                    decode_s = u["mean_itl_ms"] * (n - 1) / 1e3
                    tok_s = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
                    emit_summary(args, u["prompt_tokens"], n, u["ttft_ms"], tok_s, item.finish_reason,
                                 {"emulation": item.emulation} if item.emulation else None)
                    warning = deprecation_warning(item.trailing_metadata, args.model or "")
                    if warning:  # after the text and its summary, on a line of its own
                        print(f"wafer generate: {warning}", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"wafer generate: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    return 0


def chat_cli(args) -> int:
    """`wafer chat --server HOST:PORT`: an interactive persistent session (stdin lines). A turn
    the server rejects (e.g. the conversation outgrew the context) is reported and the session
    goes on; a closed session or a gRPC error ends it."""
    interactive = sys.stdin.isatty()
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    try:
        sampling(**kw)
    except ValueError as e:
        print(f"wafer chat: error: {e}", file=sys.stderr)
        return 2
    try:
        with WaferClient(args.server) as client, client.session(args.model) as s:
            if interactive:
                print(f"session {s.session_id} with {s.model}; empty line or Ctrl-D to quit",
                      file=sys.stderr)
            lifecycle = client.get_model(s.model).lifecycle
            if lifecycle.status == "deprecated":
                md = {"wafer-deprecated": "true", "wafer-sunset": lifecycle.sunset,
                      "wafer-successor": lifecycle.successor}
                print(f"wafer chat: {deprecation_warning(md, s.model)}", file=sys.stderr)
            while True:
                if interactive:
                    sys.stderr.write("> ")
                    sys.stderr.flush()
                try:
                    line = sys.stdin.readline()
                except KeyboardInterrupt:  # Ctrl-C at the prompt: leave, closing the session
                    line = ""
                if not line or (interactive and not line.strip()):
                    break
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                try:
                    done = _chat_turn(args, s, line, kw)
                except SessionError as e:
                    if e.code == "CLOSED":
                        raise
                    print(f"wafer chat: turn rejected: {e}", file=sys.stderr)
                    continue
                u = done.usage
                if args.json:
                    print(json.dumps({"finish_reason": done.finish_reason, **u}), flush=True)
                else:
                    print(f"[{u['completion_tokens']} tokens, {done.finish_reason}; prompt "
                          f"{u['prompt_tokens']} ({u['cached_tokens']} reused); TTFT "
                          f"{u['ttft_ms']:.1f} ms]", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"wafer chat: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except SessionError as e:
        print(f"wafer chat: error: {e}", file=sys.stderr)
        return 2
    return 0


def _chat_turn(args, s: SyncSession, line: str, kw: dict) -> Completion:
    """One turn, printed as it streams. Ctrl-C cancels the turn on the server (which ends it
    with a final, so the session goes on); a second Ctrl-C interrupts as usual. The handler only
    sends the cancel: a KeyboardInterrupt raised inside gRPC's blocking read would leave the
    session's stream unusable."""
    done = None

    def cancel_turn(signum, frame):
        signal.signal(signal.SIGINT, previous)
        s.cancel()

    main = threading.current_thread() is threading.main_thread()  # where signals are handled
    previous = signal.signal(signal.SIGINT, cancel_turn) if main else None
    try:
        for item in s.turn(messages=[{"role": "user", "content": line}], **kw):
            if isinstance(item, Token):
                if args.json:
                    print(json.dumps({"id": item.id, "text": item.text}), flush=True)
                else:
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
            else:
                done = item
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return done
