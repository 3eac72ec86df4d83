"""What the engine thread hands back: token events (one :class:`DecodeStep` per decode step for
its whole batch), finish events with usage (:class:`SeqStats`), session expiry; finish reasons."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling import FINISH_LENGTH, FINISH_STOP  # the two a stream's own tokens decide

__all__ = ["FINISH_STOP", "FINISH_LENGTH", "FINISH_CANCELLED", "FINISH_DEADLINE",
           "FINISH_SHUTDOWN", "FINISH_ERROR", "TokenEvent", "SeqStats", "DecodeStep",
           "iter_events", "FinishEvent", "SessionExpired"]


FINISH_CANCELLED = "cancelled"
FINISH_DEADLINE = "deadline"
FINISH_SHUTDOWN = "shutdown"
FINISH_ERROR = "error"


@dataclass(slots=True)
class TokenEvent:
    token_id: int
    step_ns: int          # engine compute since this sequence's previous token (decode + the prefill
                          # interleaved before it); for the first token, the request's prefill time;
                          # the tokens of one speculative verify pass each carry that pass's
    batch_size: int       # sequences in that decode step (1 for a token from prefill)
    t_ns: int             # monotonic time the engine produced it
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    in_flight: int = 0    # sequences holding KV when it was made (0 = batch_size; for the wafer clock)
    spec_k: int = 0       # draft tokens verified in the decode pass that made it (0 = none)
    spec_index: int = 0   # its place among the tokens that pass emitted (0 = the first)


@dataclass(slots=True)
class SeqStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    prefill_ns: int = 0       # engine time spent in this request's prefill calls
    queue_ns: int = 0         # from submit() to the start of its prefill (waiting for the engine)
    max_batch_size: int = 0
    preemptions: int = 0
    arrival_ns: int = 0
    first_token_ns: int = 0
    finish_ns: int = 0
    # speculative decoding: verify steps, draft tokens verified, accepted, accepted per position
    spec_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple = ()


@dataclass(slots=True)
class DecodeStep:
    """The tokens of one decode step for its whole batch, published as one item ``(None, step)``
    so the engine thread creates no per-sequence objects; :func:`iter_events` expands it into
    each request's TokenEvent on the consumer's thread."""

    reqs: list            # the batch's requests, in row order
    tokens: list          # the token each row sampled; a list for a row that verified drafts
    step_ns: int          # the decode plus the prefill work since the previous decode
    batch_size: int
    t_ns: int
    logprobs: dict | None  # row -> (logprob, top) for the rows that asked for them (a list of
                           # them for a row with a list of tokens)
    # requests whose previous token came from a prefill after the previous decode -> the prefill
    # work up to and including it (not part of their time since that token); None if none
    joined: dict | None = None
    spec: dict | None = None  # row -> draft tokens it verified, for the rows that speculated


def iter_events(items):
    """The ``(request, event)`` pairs of a published list, decode steps expanded."""
    for req, ev in items:
        if req is not None:
            yield req, ev
            continue
        lps = ev.logprobs
        joined = ev.joined
        for i, (r, tok) in enumerate(zip(ev.reqs, ev.tokens)):
            lp, top = lps[i] if lps and i in lps else (None, None)
            step_ns = ev.step_ns - joined[r] if joined and r in joined else ev.step_ns
            if type(tok) is list:  # a verify pass's tokens: one step, one time
                k = ev.spec[i]
                for j, t in enumerate(tok):
                    lp, top = lps[i][j] if lps and i in lps else (None, None)
                    yield r, TokenEvent(t, step_ns, ev.batch_size, ev.t_ns, lp, top, 0, k, j)
                continue
            yield r, TokenEvent(tok, step_ns, ev.batch_size, ev.t_ns, lp, top)


@dataclass(slots=True)
class FinishEvent:
    reason: str
    stats: SeqStats
    error: str | None = None


@dataclass(slots=True)
class SessionExpired:
    """Published to a session's ``on_close`` owner when it expires or the server shuts down."""

    reason: str
