"""A request (one generation or one session turn), the sequence that carries it (its tokens, how
many of them are in the KV cache, its blocks, the state of its current turn), and the session
that keeps a sequence between turns."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from engine.sampling import StreamPolicy
from engine.scheduler.events import SeqStats

__all__ = ["Request", "Sequence", "Session"]


@dataclass(eq=False)
class Request:
    """One generation (a Generate call or one session turn).

    ``prompt`` is the full token list the generation continues from. For a session turn with
    ``replace=False`` the prompt is appended to the session's tokens; with ``replace=True`` it is
    the whole conversation and the session's cache is reused up to the common prefix.
    """

    prompt: list[int]
    params: Any                              # engine.sampling.SamplingParams
    request_id: str = ""
    deadline_ns: int | None = None           # monotonic deadline
    session: "Session | None" = None
    replace: bool = False
    owner: Any = None                        # opaque, for the publisher (e.g. an asyncio queue)
    on_event: Callable[[Any], None] | None = None  # used by the default publisher
    arrival_ns: int = field(default_factory=time.monotonic_ns)  # when the server got the call
    submitted_ns: int = 0                    # set by submit()
    # filled by the scheduler
    seq: "Sequence | None" = None
    done: bool = False

    def __repr__(self) -> str:
        return (f"Request(id={self.request_id!r}, prompt={len(self.prompt)} tokens, "
                f"session={self.session.session_id if self.session else None}, done={self.done})")


class Sequence:
    """Tokens of one sequence, how many of them are in the KV cache, and its blocks."""

    # slots: the per-row work between two decode calls runs with caches the model call has just
    # flushed, and a slot read misses less than an instance-dict lookup
    __slots__ = ("seq_id", "tokens", "n_tokens", "num_computed", "blocks", "hashes", "table", "req",
                 "prompt_len", "max_batch", "policy", "prefilling", "stats", "scheduled", "row",
                 "spec")
    _ids = itertools.count(1)

    def __init__(self, capacity: int, max_blocks: int):
        self.seq_id = next(self._ids)
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.n_tokens = 0
        self.num_computed = 0
        self.blocks: list[int] = []          # held KV blocks (engine.scheduler.blocks)
        self.hashes: list[int] = []          # prefix ids of its leading registered full blocks
        self.table = np.zeros(max_blocks, dtype=np.int32)
        self.req: Request | None = None
        # per-turn state
        self.prompt_len = 0
        self.max_batch = 0                   # the largest decode batch it was part of
        self.policy: StreamPolicy | None = None  # its next token and when the turn ends
        self.prefilling = True
        self.stats = SeqStats()
        self.scheduled = False               # left the bounded admission count
        self.row = -1                        # its row in the decode batch, -1 when not in it
        self.spec = None                     # its turn's engine.scheduler.speculate.Speculator

    def token_list(self) -> list[int]:
        return self.tokens[: self.n_tokens].tolist()

    def set_tokens(self, ids: list[int]) -> None:
        self.tokens[: len(ids)] = ids
        self.n_tokens = len(ids)

    def append(self, tok: int) -> None:
        self.tokens[self.n_tokens] = tok
        self.n_tokens += 1

    def begin_turn(self, req: Request, cached: int, policy: StreamPolicy) -> None:
        """Start ``req`` on this sequence (its tokens already set); ``cached`` of them have KV."""
        self.req = req
        req.seq = self
        self.prompt_len = self.n_tokens
        self.max_batch = 0
        self.policy = policy
        self.prefilling = True
        self.scheduled = False
        self.stats = SeqStats(prompt_tokens=self.n_tokens, cached_tokens=cached,
                              arrival_ns=req.arrival_ns)


class Session:
    """A persistent sequence owned by one client stream."""

    _ids = itertools.count(1)

    def __init__(self, idle_timeout_s: float, owner: Any = None):
        self.session_id = f"s{next(self._ids)}"
        self.idle_timeout_s = idle_timeout_s
        self.owner = owner
        self.seq: Sequence | None = None     # created with the first turn
        self.active: Request | None = None
        self.last_active = time.monotonic()
        self.closed = False
        self.close_reason = ""

    @property
    def tokens(self) -> list[int]:
        return [] if self.seq is None else self.seq.token_list()

    @property
    def idle(self) -> bool:
        """No turn running."""
        return self.active is None or self.active.done
