"""The scheduler's limits and switches (engine.scheduler.Scheduler's ``config``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulerConfig"]


@dataclass
class SchedulerConfig:
    max_batch: int = 64               # sequences per decode step (<= the model's max_batch)
    max_waiting: int = 256            # bounded admission queue; beyond it QueueFull
    prefill_chunk: int = 64           # prefill tokens per step while others decode
    prefill_budget_idle: int = 512    # prefill tokens per step while nothing decodes (a burst of
                                      # prompts: until the first of them has its first token); it
                                      # bounds a step, between which cancels and deadlines act
                                      # (512 prompt tokens take ~1.5 s on 2 cores at the start of
                                      # a prompt; fewer deeper in, see chunk_at; prefill is
                                      # compute-bound well below 512, so bigger gains nothing)
    session_idle_timeout_s: float = 300.0
    max_sessions: int = 256
    max_queue_ms: float | None = None  # refuse a request whose estimated queue wait exceeds it
                                       # (engine.scheduler.admission); None = no bound
    prefix_caching: bool = True       # share full KV blocks of equal token prefixes across
                                      # requests and sessions (engine.scheduler.blocks)
    num_speculative_tokens: int = 0   # drafts per step for a request that leaves it unset
                                      # (0 = no speculation; engine/scheduler/speculate.py)
