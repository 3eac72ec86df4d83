"""What goes over the wire: requests built from Python values, responses turned into Token and
Completion objects. Shared by the sync and asyncio clients; depends on the protos alone."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from protos import wafer_pb2 as pb

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


class SessionError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# ------------------------------------------------------------------------------- responses


def _usage(u: pb.Usage) -> dict[str, Any]:
    return {f.name: getattr(u, f.name) for f in u.DESCRIPTOR.fields}


def final_completion(f: pb.Final, tail: list[str]) -> Completion:
    """The Completion a Final message means; ``tail`` (the text of chunks that came without a
    token, see ``chunk_tokens``) becomes its text and is emptied."""
    emu = None
    if f.HasField("emulation"):
        emu = {fd.name: getattr(f.emulation, fd.name) for fd in f.emulation.DESCRIPTOR.fields}
    text = "".join(tail)
    tail.clear()
    return Completion(f.finish_reason, _usage(f.usage), emu, text)


def chunk_tokens(c: pb.TokenChunk, received_ns: int, tail: list[str]) -> list[Token]:
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


def _md(call) -> dict[str, str]:
    try:
        return {k: v for k, v in (call.trailing_metadata() or ())}
    except Exception:
        return {}


# ------------------------------------------------------------------------------- requests

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


def tokenize_request(text: str | None = None, *, messages=None, model: str = "") -> pb.TokenizeRequest:
    req = pb.TokenizeRequest(model=model)
    _input(req, text, messages)
    return req


# ------------------------------------------------------------------------------- sessions


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


def belongs_to_abandoned(abandoned: set[str], resp: pb.SessionResponse) -> bool:
    """Whether a Session response is what is left of a turn the client gave up on (its id is in
    ``abandoned``): skip it. A session-wide `closed` is never skipped, whichever turn it names; an
    abandoned turn's final or error ends it, and its id leaves ``abandoned``."""
    kind = resp.WhichOneof("kind")
    if resp.turn_id not in abandoned or kind == "closed":
        return False
    if kind in ("final", "error"):  # that turn has ended
        abandoned.discard(resp.turn_id)
    return True


def _session_items(session, resp) -> tuple[list, bool]:
    """What one Session response means for the turn in progress: its tokens, or its final
    Completion (done=True); an error or a server-side close ends the turn and raises
    SessionError."""
    kind = resp.WhichOneof("kind")
    if kind == "chunk":
        return chunk_tokens(resp.chunk, time.monotonic_ns(), session._tail), False
    if kind in ("final", "error", "closed"):
        session._current = None
    if kind == "final":
        return [final_completion(resp.final, session._tail)], True
    if kind == "error":
        raise SessionError(resp.error.code, resp.error.message)
    if kind == "closed":
        session.closed_reason = resp.closed.reason
        raise SessionError("CLOSED", f"session closed by the server ({resp.closed.reason})")
    return [], False
