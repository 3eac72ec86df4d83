"""Commands other threads send the engine thread, and the inbox they wait in.

Each command is a small frozen dataclass; the engine thread applies them between two steps,
dispatching on their type. The :class:`Inbox` also keeps the bounded admission count (requests
submitted and not yet scheduled once) and whether new work is accepted, under one lock.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from engine.scheduler.sequence import Request

__all__ = ["QueueFull", "SchedulerClosed", "Submit", "Cancel", "CloseSession", "FinishAll",
           "Command", "Inbox"]


class QueueFull(Exception):
    """The bounded waiting queue is full (maps to RESOURCE_EXHAUSTED)."""


class SchedulerClosed(Exception):
    """The scheduler is draining or stopped and takes no new work (maps to UNAVAILABLE)."""


@dataclass(frozen=True, slots=True)
class Submit:
    req: Request


@dataclass(frozen=True, slots=True)
class Cancel:
    req: Request


@dataclass(frozen=True, slots=True)
class CloseSession:
    session: Any          # engine.scheduler.sessions.Session
    reason: str           # "client" (the owner closed it), "idle", "shutdown"


@dataclass(frozen=True, slots=True)
class FinishAll:
    reason: str           # the finish reason of every waiting and running request


Command = Submit | Cancel | CloseSession | FinishAll


class Inbox:
    """Thread-safe: any thread puts commands, the engine thread pops them. ``wake`` is set on
    every put so an idle engine thread waiting on it wakes at once."""

    def __init__(self, max_waiting: int, clock: Callable[[], int] = time.monotonic_ns):
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.max_waiting = max_waiting
        self.accepting = True
        self.pending_new = 0      # submitted, not yet scheduled once (the bounded queue)
        self._clock = clock
        self._q: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._q)

    def submit(self, req: Request, room: int) -> None:
        """Queue ``req``; ``room`` is how many more sequences the running batch takes: submitted
        requests it has room for are about to run, not waiting (a burst on an idle engine is not
        refused before the engine has admitted any of it)."""
        with self.lock:
            if not self.accepting:
                raise SchedulerClosed("the server is shutting down and takes no new requests")
            waiting = self.pending_new - max(0, room)
            if waiting >= self.max_waiting:
                raise QueueFull(f"waiting queue is full: {waiting} requests waiting, "
                                f"limit max_waiting={self.max_waiting}")
            self.pending_new += 1
            req.submitted_ns = self._clock()
            self._q.append(Submit(req))
        self.wake.set()

    def put(self, cmd: Command) -> None:
        self._q.append(cmd)
        self.wake.set()

    def pop(self) -> Command:
        """The oldest command (engine thread; the inbox must not be empty)."""
        return self._q.popleft()

    def scheduled(self) -> None:
        """A submitted request was scheduled (or dropped): it no longer counts as waiting."""
        with self.lock:
            self.pending_new -= 1

    def pending_submits(self) -> int:
        return sum(1 for c in list(self._q) if type(c) is Submit)
