"""The wafer's clock for the server: when would each token of a stream leave the wafer?

    clock = WaferClock.from_spec("wse3:llama-3.1-8b")
    clock.ttft_us(prompt_tokens=512)                  # arrival -> first token
    clock.itl_us(context_len=600)                     # gap before the token at that context
    clock.itl_us(600, drafts=4)                       # gap before a verify pass of 4 drafts
    clock.departure_times_us(512, 256)                # offsets from arrival, token i at [i]

All times are microseconds as floats derived from integer cycle counts, so they are
deterministic. The model is placed once in the constructor (milliseconds); per-call work is a
few integer operations (itl) or one numpy pass over the prompt (ttft, memoised).
`sequences_in_flight` is how many sequences share the layer pipeline at that moment: with more
than the pipeline can interleave for free, every sequence's gaps stretch (see sim/timing.py).
"""

from __future__ import annotations

import functools

from sim.hardware import HardwareSpec, get_hardware
from sim.placement import plan
from sim.shapes import ModelShape, get_shape
from sim.timing import TimingModel

DEFAULT_CONTEXT = 8192  # plan context when none is given (the model's own, if smaller)


class WaferClock:
    def __init__(self, hw: HardwareSpec, shape: ModelShape, max_sequences: int = 1,
                 context: int | None = None):
        """Place `shape` on `hw` with KV room for `max_sequences` x `context` tokens (default
        min(8192, model context)). Raises sim.placement.PlacementError if it cannot fit."""
        if max_sequences < 1:
            raise ValueError(f"max_sequences={max_sequences} must be >= 1")
        self.hw, self.shape = hw, shape
        self.max_sequences = max_sequences
        self.context = min(DEFAULT_CONTEXT, shape.context_length) if context is None else context
        self.plan = plan(shape, hw, self.context, max_sequences)
        self.timing = TimingModel(self.plan)
        self._us_per_cycle = 1e6 / hw.clock_hz

    @classmethod
    def from_spec(cls, spec: str, max_sequences: int = 1, context: int | None = None) -> "WaferClock":
        """`spec` is "<hw preset>:<model preset>[:8]", e.g. "wse3:llama-3.1-8b" or
        "wse3:llama-3.1-70b:8" for 8-bit weights."""
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"emulate spec {spec!r} must look like 'wse3:llama-3.1-8b'")
        precision = int(parts[2]) if len(parts) == 3 else 16
        try:
            shape = get_shape(parts[1], precision)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return cls(get_hardware(parts[0]), shape, max_sequences, context)

    @property
    def n_wafers(self) -> int:
        return self.plan.n_wafers

    def _seqs(self, n: int) -> int:
        return max(1, int(n))

    @functools.lru_cache(maxsize=4096)
    def ttft_us(self, prompt_tokens: int, cached_tokens: int = 0, sequences_in_flight: int = 1) -> float:
        """Request arrival to the first generated token leaving the wafer, microseconds.
        Prompt tokens already in the KV cache (`cached_tokens`) are not streamed again; at least
        the last prompt token always runs."""
        cycles = self.timing.ttft_cycles(max(1, prompt_tokens), cached_tokens, self._seqs(sequences_in_flight))
        return cycles * self._us_per_cycle

    def itl_us(self, context_len: int, sequences_in_flight: int = 1, drafts: int = 0) -> float:
        """Gap between the previous token and the token generated while attending over
        `context_len` positions, microseconds. With `drafts` (speculative decoding) the gap
        before a verify pass of the last token and that many drafts: every token the pass
        accepts leaves at its end."""
        return self.timing.itl_cycles(max(1, context_len), self._seqs(sequences_in_flight),
                                      max(0, int(drafts))) * self._us_per_cycle

    def departure_times_us(self, prompt_tokens: int, n_tokens: int, cached_tokens: int = 0,
                           sequences_in_flight: int = 1) -> list[float]:
        """Offsets from request arrival, microseconds: token i (0 = first) leaves at [i].
        Non-decreasing; [0] == ttft_us(...), [i] - [i-1] == itl_us(prompt_tokens + i, ...)."""
        cycles = self.timing.departure_cycles(max(1, prompt_tokens), n_tokens, cached_tokens,
                                              self._seqs(sequences_in_flight))
        return (cycles * self._us_per_cycle).tolist()

    def __repr__(self) -> str:
        return (f"WaferClock({self.hw.name}:{self.shape.name}, wafers={self.n_wafers}, "
                f"context={self.context}, max_sequences={self.max_sequences})")
