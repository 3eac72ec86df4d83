"""Stamping and pacing streamed tokens on a simulated wafer's clock (``wafer serve --emulate``).

Every token gets a simulated departure time measured from the request's arrival: the first at
the wafer's TTFT for the prompt, each next one an inter-token latency later (at the context length
it was generated at). With pace ``realtime`` the server holds each chunk until its last token's
simulated time, so a client sees the wafer's TTFT and gaps; with ``none`` the times are only
carried. A token that leaves after its simulated time carries how late it is; never silent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

PACES = ("realtime", "none")
LATE_SLACK_US = 1000  # lateness under this counts as on time in the summary


class EmulationError(ValueError):
    pass


class Emulator:
    """One simulated target (e.g. ``wse3:llama-3.1-8b``) shared by the streams of a model."""

    def __init__(self, target: str, pace: str = "realtime", kv_tokens: int | None = None):
        """``kv_tokens``: the engine's KV pool. The simulated wafers are sized to hold as many
        tokens of KV (sequences of the emulated model's plan context), so streams are never
        timed on a wafer that could not hold what the engine holds at once."""
        if pace not in PACES:
            raise EmulationError(f"pace={pace!r}; expected one of {PACES}")
        try:
            from sim.clock import WaferClock
        except ImportError as e:  # the simulator package is missing
            raise EmulationError(f"emulation needs sim.clock: {e}") from None
        try:
            clock = WaferClock.from_spec(target)
            if kv_tokens is not None and kv_tokens > clock.context:
                clock = WaferClock.from_spec(target, max_sequences=-(-kv_tokens // clock.context))
            self.clock = clock
        except Exception as e:
            raise EmulationError(f"emulate={target!r}: {e}") from None
        self.target = target
        self.pace = pace

    def stream(self, arrival_ns: int, prompt_tokens: int, cached_tokens: int) -> "StreamClock":
        return StreamClock(self, arrival_ns, prompt_tokens, cached_tokens)


@dataclass
class StreamClock:
    emu: Emulator
    arrival_ns: int
    prompt_tokens: int
    cached_tokens: int
    n: int = 0
    sim_us: float = 0.0
    sim_ttft_us: float = 0.0
    max_late_us: int = 0
    last_late_us: int = 0
    late_tokens: int = 0

    def next_time_us(self, in_flight: int, spec_k: int = 0, spec_index: int = 0) -> int:
        """Simulated departure time of the next token, microseconds after arrival. A token a
        speculative verify pass of ``spec_k`` drafts made leaves at that pass's end: the pass's
        first token (``spec_index`` 0) advances the clock by the pass's cost, the others it
        accepted with it leave at the same time."""
        in_flight = max(1, in_flight)
        clock = self.emu.clock
        if spec_index and self.n:
            self.n += 1
            return int(round(self.sim_us))
        if self.n == 0:
            self.sim_us = float(clock.ttft_us(self.prompt_tokens, cached_tokens=self.cached_tokens,
                                              sequences_in_flight=in_flight))
            self.sim_ttft_us = self.sim_us
        else:
            ctx = self.prompt_tokens + self.n
            self.sim_us += float(clock.itl_us(ctx, sequences_in_flight=in_flight, drafts=spec_k))
        self.n += 1
        return int(round(self.sim_us))

    async def wait_until(self, sim_time_us: int) -> None:
        """Realtime pacing: sleep until ``arrival + sim_time_us``."""
        if self.emu.pace != "realtime":
            return
        due_ns = self.arrival_ns + sim_time_us * 1000
        delay = (due_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
            # asyncio.sleep may wake a little early on coarse timers: spin the remainder
            while time.monotonic_ns() < due_ns:
                await asyncio.sleep(0)

    def lateness_us(self, sim_time_us: int, sent_ns: int, n_tokens: int = 1) -> int:
        """How late a chunk of ``n_tokens`` due at ``sim_time_us`` left at ``sent_ns``."""
        late = max(0, (sent_ns - self.arrival_ns) // 1000 - sim_time_us)
        self.max_late_us = max(self.max_late_us, late)
        self.last_late_us = late
        if late > LATE_SLACK_US:
            self.late_tokens += n_tokens
        return late
