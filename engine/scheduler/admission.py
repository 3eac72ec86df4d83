"""Admission by predicted wait: refuse at submit a request that would wait too long in the queue.

A queue bounded by count alone (``max_waiting``) lets an admitted request wait tens of seconds
for its first token under overload (SmolLM2, 2 cores, 264 requests at once: p50 23 s). This
module estimates, at submit and in O(1), how long a new request would wait before its prefill
starts (its ``Usage.queue_ms``). A model with ``max_queue_ms`` (registry key, ``wafer serve
--max-queue-ms``; off by default) refuses it (:class:`Overloaded`, a :class:`QueueFull`:
RESOURCE_EXHAUSTED) when the estimate exceeds

- ``max_queue_ms``, or
- the call's remaining deadline, when shorter: a request that cannot even start before its
  deadline is refused at once with RESOURCE_EXHAUSTED ("overloaded, retry elsewhere or later", as
  vLLM's and TGI's 429), not left to expire with DEADLINE_EXCEEDED after occupying the queue.
  Only the wait for others counts: on an idle engine the estimate is 0 and nothing is refused.

The estimate (seconds) is the larger of two bounds on the queue wait:

- prefill: the prompt tokens still to prefill ahead of it (queued, and the rest of chunked
  prefills) in the steps they need (one per ``prefill_chunk`` tokens, at least one per request
  ahead), each step costing the measured ``a + b x tokens`` of prefill work plus, while anything
  decodes, one decode step at the measured decode step time;
- slots: when the running batch is full, the k-th request ahead waits for k sequences to finish;
  sequences finish at about ``max_batch / (mean completion tokens x step time)`` per second.

The rates come from the engine's own steps: the prefill cost ``a + b x tokens`` of a step is an
exponentially weighted least-squares fit over recent prefill steps (a per-step overhead apart:
a ratio of tokens to seconds would take a burst of 3-token prompts for a slow engine), the
decode-step and whole-step times and the completion tokens of finished requests are
exponentially weighted means. Until a couple of prefill steps were measured (one of them of
BIG_STEP_TOKENS or more) the estimate is 0 (nothing refused): under a burst on a slow engine a
step can take seconds, so the estimate must start from the first steps, not wait for many.
Tests :meth:`WaitEstimator.force` the rates.

Bookkeeping (running sums, so a submit reads a handful of numbers): each submit charges its
prompt's tokens (``inbox_tokens``); when the engine applies the submit the charge becomes the
sequence's real count of tokens to prefill (``engine_tokens``: a session turn reuses its cached
prefix), which prefill steps, finishes and preemptions then adjust; it is reset to 0 whenever
nothing waits or prefills, so an approximation never outlives a busy period.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from engine.scheduler.commands import QueueFull

__all__ = ["Overloaded", "WaitEstimate", "WaitEstimator"]

EWMA_ALPHA = 0.2  # weight of the newest step time / completion length
FIT_ALPHA = 0.05  # weight of the newest prefill step in the cost fit (~20 steps' memory)
MIN_PREFILL_STEPS = 2  # measured prefill steps before the estimate says anything, one of them
BIG_STEP_TOKENS = 32   # at least this big (a step of a few tokens is all overhead: it would
                       # make every token look dear); or CALIBRATED_STEPS steps of any size
CALIBRATED_STEPS = 8


class Overloaded(QueueFull):
    """The estimated queue wait exceeds the model's max_queue_ms or the call's deadline
    (RESOURCE_EXHAUSTED, as any QueueFull)."""

    def __init__(self, message: str, estimate: "WaitEstimate"):
        super().__init__(message)
        self.estimate = estimate


@dataclass(frozen=True)
class WaitEstimate:
    wait_s: float            # the estimate: max(prefill_s + interleave_s, slot_s)
    tokens_ahead: int        # prompt tokens to prefill before this request's
    requests_ahead: int      # submitted requests not yet scheduled
    running: int
    prefill_s: float
    interleave_s: float
    slot_s: float

    @property
    def wait_ms(self) -> float:
        return self.wait_s * 1e3


def _ewma(old: float, new: float) -> float:
    return new if old == 0.0 else old + EWMA_ALPHA * (new - old)


class PrefillFit:
    """``seconds = a + b x tokens`` of a step's prefill work, by exponentially weighted least
    squares over the steps seen (decayed running sums: O(1) per step)."""

    def __init__(self, alpha: float = FIT_ALPHA):
        self.decay = 1.0 - alpha
        self.w = self.x = self.y = self.xx = self.xy = 0.0
        self.steps = 0
        self.big_steps = 0
        self.a = self.b = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self.w = d * self.w + 1.0
        self.x = d * self.x + tokens
        self.y = d * self.y + seconds
        self.xx = d * self.xx + tokens * tokens
        self.xy = d * self.xy + tokens * seconds
        self.steps += 1
        self.big_steps += tokens >= BIG_STEP_TOKENS
        mx, my = self.x / self.w, self.y / self.w
        var, cov = self.xx / self.w - mx * mx, self.xy / self.w - mx * my
        a = b = -1.0
        if var > 1e-6 * mx * mx and cov > 0:
            b = cov / var
            a = my - b * mx
        if a < 0 or b <= 0:  # all steps alike, or noise: the plain ratio
            a, b = 0.0, my / mx
        self.a, self.b = a, b

    @property
    def calibrated(self) -> bool:
        return self.b > 0 and (self.steps >= CALIBRATED_STEPS
                               or (self.steps >= MIN_PREFILL_STEPS and self.big_steps > 0))

    def set(self, a: float, b: float) -> None:
        self.a, self.b, self.steps = a, b, CALIBRATED_STEPS


class WaitEstimator:
    """Running sums and measured rates of one scheduler. ``charge``/``uncharge`` run on any
    thread (under ``lock``); ``settle``, ``prefilled``, ``dropped``, ``requeued`` and ``observe``
    on the engine thread."""

    def __init__(self, max_batch: int, prefill_chunk: int, max_queue_ms: float | None = None):
        self.max_batch = max_batch
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_queue_ms = max_queue_ms or None
        self.lock = threading.Lock()
        self.inbox_tokens = 0      # charges of submits the engine has not applied yet
        self.engine_tokens = 0     # tokens left to prefill in waiting and partially prefilled sequences
        self._charges: dict = {}   # request -> its charge, until the engine applies its submit
        # measured; 0 = not measured yet
        self.prefill = PrefillFit()  # a step's prefill seconds = a + b x tokens
        self.decode_step_s = 0.0   # one batched decode call
        self.step_s = 0.0          # a whole step with a decode (decode + interleaved prefill)
        self.completion_tokens = 0.0  # of a finished request
        self.forced = False
        self.refused = 0           # requests refused so far (a plain int, read by anyone)

    # ---------------------------------------------------------------- the estimate

    @property
    def calibrated(self) -> bool:
        return self.prefill.calibrated

    @property
    def prefill_tok_s(self) -> float:
        """The marginal prefill rate (1 / b)."""
        return 1.0 / self.prefill.b if self.prefill.b > 0 else 0.0

    @property
    def tokens_ahead(self) -> int:
        return max(0, self.inbox_tokens + self.engine_tokens)

    def estimate(self, requests_ahead: int, running: int) -> WaitEstimate:
        tokens = self.tokens_ahead
        if not self.calibrated:
            return WaitEstimate(0.0, tokens, requests_ahead, running, 0.0, 0.0, 0.0)
        steps = max(requests_ahead, math.ceil(tokens / self.prefill_chunk)) if tokens else 0
        prefill_s = steps * self.prefill.a + tokens * self.prefill.b
        busy = running > 0 or requests_ahead > 0
        interleave_s = steps * self.decode_step_s if busy else 0.0
        slots = requests_ahead + running - self.max_batch + 1  # sequences that must finish first
        slot_s = (slots * self.completion_tokens * self.step_s / self.max_batch) if slots > 0 else 0.0
        return WaitEstimate(max(prefill_s + interleave_s, slot_s), tokens, requests_ahead, running,
                            prefill_s, interleave_s, slot_s)

    def check(self, est: WaitEstimate, deadline_s: float | None) -> str | None:
        """Why a request with this estimate (and ``deadline_s`` of its deadline left) is refused,
        or None."""
        if est.wait_s <= 0 or self.max_queue_ms is None:  # admission by predicted wait is off
            return None
        why = (f"({est.tokens_ahead} prompt tokens ahead at {self.prefill_tok_s:.0f} tok/s, "
               f"{est.requests_ahead} requests queued, {est.running} running); retry later")
        if self.max_queue_ms is not None and est.wait_ms > self.max_queue_ms:
            return (f"estimated queue wait {est.wait_ms:.0f} ms exceeds max_queue_ms="
                    f"{self.max_queue_ms:g} {why}")
        if deadline_s is not None and est.wait_s > deadline_s:
            return (f"estimated queue wait {est.wait_ms:.0f} ms exceeds the call's remaining "
                    f"deadline of {max(0.0, deadline_s) * 1e3:.0f} ms {why}")
        return None

    # ---------------------------------------------------------------- the sums

    def charge(self, req, tokens: int) -> None:
        with self.lock:
            self._charges[req] = tokens
            self.inbox_tokens += tokens

    def uncharge(self, req) -> None:
        """A submit that did not enter the inbox after all (queue full, shutting down)."""
        with self.lock:
            self.inbox_tokens -= self._charges.pop(req, 0)

    def settle(self, req, to_prefill: int) -> None:
        """The engine applied ``req``'s submit: ``to_prefill`` tokens to prefill (0: dropped)."""
        with self.lock:
            self.inbox_tokens -= self._charges.pop(req, 0)
        self.engine_tokens += to_prefill

    def prefilled(self, n: int) -> None:
        self.engine_tokens = max(0, self.engine_tokens - n)

    dropped = prefilled  # a sequence left with n tokens unprefilled (finished, cancelled)

    def requeued(self, n: int) -> None:
        """A preempted sequence will recompute ``n`` tokens."""
        self.engine_tokens += n

    def reset_engine(self) -> None:
        """Nothing waits or prefills: nothing is left to prefill."""
        self.engine_tokens = 0

    # ---------------------------------------------------------------- measurements

    def observe(self, decode_ns: int, prefill_tokens: int, prefill_ns: int, step_ns: int) -> None:
        """One engine step: its decode call, its prefill work and its whole time."""
        if self.forced:
            return
        if prefill_tokens > 0 and prefill_ns > 0:
            self.prefill.add(prefill_tokens, prefill_ns / 1e9)
        if decode_ns > 0:
            self.decode_step_s = _ewma(self.decode_step_s, decode_ns / 1e9)
            self.step_s = _ewma(self.step_s, step_ns / 1e9)

    def finished(self, completion_tokens: int) -> None:
        if not self.forced:
            self.completion_tokens = _ewma(self.completion_tokens, float(completion_tokens))

    def force(self, prefill_tok_s: float, decode_step_s: float = 0.0, step_s: float | None = None,
              completion_tokens: float = 0.0, prefill_step_s: float = 0.0) -> None:
        """Pin the measured rates (tests, what-if runs); measurements no longer change them."""
        self.prefill.set(prefill_step_s, 1.0 / prefill_tok_s)
        self.decode_step_s = decode_step_s
        self.step_s = decode_step_s if step_s is None else step_s
        self.completion_tokens = completion_tokens
        self.forced = True
