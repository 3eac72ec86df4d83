"""Requests -> engine inputs: prompt token ids, SamplingParams, ids, coalescing; every refusal an
:class:`Invalid` carrying its gRPC status and a message naming the field and the limit.

One place decides whether a prompt leaves room to generate (:func:`check_room`), for a Generate
call, a session's conversation and a bare SamplingParams alike.
"""

from __future__ import annotations

import asyncio

import grpc

from engine.sampling import SamplingParams
from engine.tokenizer import LONG_TEXT_CHARS
from protos import wafer_pb2 as pb

DEFAULT_MAX_TOKENS = 256
MAX_COALESCE = 256
ROLES = ("system", "user", "assistant")
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


def invalid(msg: str) -> Invalid:
    """An INVALID_ARGUMENT refusal."""
    return Invalid(grpc.StatusCode.INVALID_ARGUMENT, msg)


# ------------------------------------------------------------------------- prompts


def messages_to_dicts(messages) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise invalid(f"messages[{i}].role={m.role!r} must be one of {', '.join(ROLES)}")
        out.append({"role": m.role, "content": m.content})
    return out


def check_fits(tokenizer, what: str, text: str, context_length: int, slack: int = 1) -> None:
    """Refuse a text that cannot fit the context, encoding at most a bounded prefix of it: beyond
    ``context * max_token_chars`` characters no tokenization fits; beyond PROBE_CHARS_PER_TOKEN
    characters per token of context, the token count of a prefix cut at a word boundary decides
    (words are encoded one by one, so such a prefix has no more tokens than the whole).
    Encoding competes for the cores with the decode (a 450k-character prompt stalled a running
    stream ~0.5 s), so a huge prompt must not be encoded whole just to be refused."""
    n = len(text)
    max_chars = context_length * tokenizer.max_token_chars
    if n > max_chars:
        raise invalid(f"{what}: {n} characters cannot fit the model's context of {context_length} "
                      f"tokens (at most {max_chars} characters)")
    probe = context_length * PROBE_CHARS_PER_TOKEN
    cut = word_boundary_before(text, probe) if n > probe else -1
    if cut > 0:
        k = len(tokenizer.encode(text[:cut]))
        if k > context_length + slack:
            raise invalid(f"{what}: more than {context_length} tokens (its first {cut} characters "
                          f"alone are {k}); the model's context is {context_length} tokens")


def word_boundary_before(text: str, end: int) -> int:
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
        raise invalid(f"input: empty prompt; set one of {inputs}")
    if which == "messages":
        if len(msg.messages.messages) > context_length:  # each message renders to a token or more
            raise invalid(f"messages: {len(msg.messages.messages)} messages cannot fit the model's "
                          f"context of {context_length} tokens")
        msgs = messages_to_dicts(msg.messages.messages)
        if not msgs:
            raise invalid("messages: empty prompt; give at least one message")
        check_fits(tokenizer, "messages", "\n".join(m["content"] for m in msgs), context_length,
                   slack=len(msgs))
        return tokenizer.encode_chat(msgs, add_generation_prompt=True), msgs
    if which == "text":
        if not msg.text:
            raise invalid("text: empty prompt")
        check_fits(tokenizer, "text", msg.text, context_length)
        return tokenizer.encode(msg.text), None
    ids = list(msg.token_ids.ids)
    if not ids:
        raise invalid("token_ids: empty prompt")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise invalid(f"token_ids[{i}]={t} is outside the vocabulary [0, {vocab_size})")
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


def check_room(what: str, n_tokens: int, context_length: int) -> None:
    """A prompt (or a session's whole conversation) must leave at least one position of the
    context to generate into."""
    if n_tokens >= context_length:
        raise invalid(f"{what} of {n_tokens} tokens leaves no room to generate in the model's "
                      f"context of {context_length} tokens (at most {context_length - 1})")


def check_tokenizable(what: str, n_tokens: int, context_length: int) -> None:
    """Tokenize answers for anything that fits the context (a prompt there needs no room after it)."""
    if n_tokens > context_length:
        raise invalid(f"{what}: prompt of {n_tokens} tokens is longer than the model's context "
                      f"of {context_length} tokens")


# ------------------------------------------------------------------------- parameters


def sampling_params(sp: pb.SamplingParams, *, vocab_size: int, context_length: int,
                    prompt_len: int, kv_tokens: int | None = None) -> SamplingParams:
    """A proto SamplingParams as an engine SamplingParams: unset optional fields take their
    defaults, then the engine's own checks (each names the field and the limit) and the KV pool's."""
    check_room("prompt", prompt_len, context_length)
    room = context_length - prompt_len
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
        # unset: the scheduler's default (SchedulerConfig.num_speculative_tokens)
        num_speculative_tokens=(sp.num_speculative_tokens if sp.HasField("num_speculative_tokens")
                                else None),
        prompt_lookup_max=(sp.prompt_lookup_max if sp.HasField("prompt_lookup_max")
                           else SamplingParams.prompt_lookup_max),
    )
    if sp.HasField("prompt_lookup_min"):
        params.prompt_lookup_min = sp.prompt_lookup_min
    else:  # the default, or a smaller prompt_lookup_max
        params.prompt_lookup_min = min(SamplingParams.prompt_lookup_min, max(1, params.prompt_lookup_max))
    try:
        params.validate(vocab_size, context_length, prompt_len)
    except ValueError as e:
        raise invalid(str(e)) from None
    if kv_tokens is not None and prompt_len + max_tokens > kv_tokens:
        raise invalid(f"max_tokens={max_tokens}: prompt {prompt_len} + max_tokens {max_tokens} tokens "
                      f"exceed the KV pool of {kv_tokens} tokens")
    return params


def check_id(field: str, value: str) -> None:
    """A client's id goes into logs and replies: bounded, one line."""
    if len(value) > MAX_ID_CHARS:
        raise invalid(f"{field} has {len(value)} characters, limit {MAX_ID_CHARS}")
    if any(c in value for c in "\r\n"):
        raise invalid(f"{field} must be one line (no line breaks)")


def coalesce_of(n: int) -> int:
    """Tokens per chunk: 0 (unset) means one."""
    if n == 0:
        return 1
    if not 1 <= n <= MAX_COALESCE:
        raise invalid(f"coalesce_tokens={n} must be in [1, {MAX_COALESCE}]")
    return n


def idle_timeout_of(idle_timeout_s: int) -> float | None:
    """A session's idle timeout as asked by its client: 0 (unset) means the server's default."""
    idle = idle_timeout_s or None
    if idle is not None and idle > MAX_IDLE_TIMEOUT_S:
        raise invalid(f"idle_timeout_s={idle} exceeds the limit of {MAX_IDLE_TIMEOUT_S} s")
    return idle
