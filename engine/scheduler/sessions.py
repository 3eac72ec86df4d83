"""The store of open sessions (limit, idle expiry, least recently used cache) and how a turn
continues a session's tokens. A :class:`~engine.scheduler.sequence.Session` keeps its sequence
(tokens + KV blocks) between turns."""

from __future__ import annotations

import time
from typing import Any, Iterator

from engine.scheduler.sequence import Request, Sequence, Session

__all__ = ["SessionStore", "EXPIRY_CHECK_S", "turn_tokens"]

EXPIRY_CHECK_S = 0.05  # how often the engine thread looks for idle sessions


class SessionStore(dict):
    """The open sessions by id (a dict: the scheduler's ``sessions``, read by metrics)."""

    def __init__(self, max_sessions: int):
        super().__init__()
        self.max_sessions = max_sessions
        self._next_expiry_check = 0.0

    def open(self, idle_timeout_s: float, owner: Any = None) -> Session | None:
        """A new session; None when ``max_sessions`` are open (the caller holds the lock)."""
        live = sum(1 for s in self.values() if not s.closed)
        if live >= self.max_sessions:
            return None
        s = Session(idle_timeout_s, owner)
        self[s.session_id] = s
        return s

    def expired(self) -> Iterator[Session]:
        """The idle sessions past their timeout (looked for every EXPIRY_CHECK_S at most)."""
        if not self:
            return
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + EXPIRY_CHECK_S
        for s in list(self.values()):
            if s.idle and now - s.last_active > s.idle_timeout_s:
                yield s

    def least_recently_used_cache(self) -> Session | None:
        """The idle session holding KV blocks that was active longest ago, if any."""
        idle = [s for s in self.values() if s.seq is not None and s.seq.blocks and s.idle]
        return min(idle, key=lambda s: s.last_active) if idle else None


def turn_tokens(seq: Sequence, req: Request) -> tuple[list[int], int]:
    """A session turn's whole token list, and how many leading tokens of it the session's cache
    already holds (appended turn: all it computed; ``replace``: the common prefix)."""
    if req.replace:
        old = seq.token_list()
        target = list(req.prompt)
        common = 0
        limit = min(seq.num_computed, len(target))
        while common < limit and old[common] == target[common]:
            common += 1
        return target, common
    return seq.token_list() + list(req.prompt), seq.num_computed
