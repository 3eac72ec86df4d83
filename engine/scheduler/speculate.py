"""Speculative decoding by prompt lookup (no draft model): the n-gram proposer, the acceptance
rule, and when to speculate.

A sequence that speculates feeds the decode step its last token plus ``k`` draft tokens, as
``k + 1`` rows at consecutive positions (``Model.decode_rows``); row ``i``'s logits are the
model's distribution for the token after draft ``i``. Drafts come from the sequence itself
(vLLM's ``ngram`` method): the longest suffix n-gram (``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens) that occurred earlier in prompt + output proposes the ``k``
tokens that followed it. Input-grounded output (code edits, quoting, summaries) copies long
runs of its prompt, so a step can emit several tokens for about the price of one.

The acceptance rule keeps the output's law exactly that of plain decoding:

- greedy: draft ``i`` is accepted while it equals the token plain decoding picks from row
  ``i - 1``; the first mismatch emits that pick instead (the correction); all ``k`` accepted
  add the last row's pick (the bonus). Token for token the output of plain greedy decoding,
  since the engine's logits do not depend on the batch or the number of rows.
- sampled: a draft is a point mass q(x) = 1, so draft x is accepted with probability p(x)
  (p: the distribution :class:`engine.sampling.Sampler` draws from: temperature, penalties,
  top-k/p, min-p); on rejection the token is drawn from p with x removed, renormalised
  (max(p - q, 0) normalised); all accepted, the bonus is drawn from the last row. The
  sequence's seeded generator draws, so a seed makes a speculative completion reproducible.

Stop conditions are checked token by token over the emitted tokens: nothing past a stop.

Adaptive (:class:`Speculator`): per sequence, a decayed count of accepted and rejected drafts
estimates the per-token acceptance ``a``; each step drafts the ``k`` (at most the request's)
that maximises the expected tokens per time, ``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens for a
step that costs ``STEP_COST[numerics]`` of its rows (measured; :meth:`Speculator.plan`). When no ``k``
gains ``MIN_GAIN``, the sequence stops speculating for a back-off that
doubles (``PAUSE_MIN`` .. ``PAUSE_MAX`` steps) and then probes once with the cheapest drafts: free writing, where lookups rarely hit, pays almost nothing.
"""

from __future__ import annotations

import numpy as np

from engine import kernels as K
from engine.sampling import _draw  # the one-draw routine Sampler uses

__all__ = ["propose", "Speculator", "STEP_COST"]

# A decode step's time by its rows, relative to one row, per numeric mode (SmolLM2-135M, 2 cores,
# min of 40, `python -m benches.bench_speculation --step-cost [--numerics fast]`, 2026-12-06;
# exact: 4.7 / 6.2 / 6.7 / 7.5 / 8.1 ms). The matrix-vector kernels take 1-5 rows in one pass
# over the weights (the unpacking is shared, the multiply-adds are not; fast mode's integer
# kernels take 5 in two); from GEMV_MAX_TOKENS + 1 rows on, the matrix path is compute-bound
# and a draft row costs about what a token does: no speculation there. Re-measure when the
# kernels change.
STEP_COST = {"exact": (1.0, 1.3, 1.42, 1.58, 1.72),
             "fast": (1.0, 1.22, 1.38, 1.76, 1.99)}
MIN_GAIN = 1.05         # expected tokens per time, relative to plain decoding, below this: stop
                        # speculating for a while
DECAY = 0.7             # weight of the past in the acceptance estimate, per speculative step
PAUSE_MIN, PAUSE_MAX = 4, 64  # steps without speculation after a failing estimate (doubling)
PRIOR_ACCEPTED, PRIOR_REJECTED = 2.0, 1.0  # the estimate before any step: a = 2/3


@K.jit
def propose(tokens, n, min_n, max_n, k, out):
    """Draft tokens for ``tokens[:n]`` into ``out``; returns how many (0 when no n-gram of at
    least ``min_n`` tokens that ends the sequence occurred before). The longest match of up to
    ``max_n`` tokens wins, the most recent among equals; it proposes the ``k`` tokens that
    followed it, continuing into the drafts themselves where a match overlaps the suffix (a
    repeating run proposes its next period). O(n) with an early exit, no allocation."""
    if n < min_n + 1 or k <= 0:
        return 0
    max_n = min(max_n, n - 1)
    best_len = 0
    best_end = -1
    for j in range(n - 2, min_n - 2, -1):  # j: the last token of an earlier occurrence
        length = 0
        while length < max_n and length <= j and tokens[j - length] == tokens[n - 1 - length]:
            length += 1
        if length > best_len:
            best_len = length
            best_end = j
            if length == max_n:
                break
    if best_len < min_n:
        return 0
    for i in range(k):
        src = best_end + 1 + i
        out[i] = tokens[src] if src < n else out[src - n]
    return k


def expected_tokens(a: float, k: int) -> float:
    """Tokens a verify step of ``k`` drafts emits at per-token acceptance ``a``."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class Speculator:
    """One sequence's speculation: its drafts, the acceptance rule, the adaptive choice of ``k``
    and its counts (steps that verified drafts, drafts, accepted drafts, accepted per position)."""

    __slots__ = ("k_max", "min_n", "max_n", "cost", "drafts", "acc", "rej", "pause", "backoff",
                 "probe", "steps", "drafted", "accepted", "per_pos")

    def __init__(self, k: int, prompt_lookup_min: int, prompt_lookup_max: int, numerics: str = "exact"):
        self.k_max = k
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max
        self.cost = STEP_COST[numerics]
        self.drafts = np.zeros(k, dtype=np.int32)
        self.acc, self.rej = PRIOR_ACCEPTED, PRIOR_REJECTED
        self.pause = 0
        self.backoff = PAUSE_MIN
        self.probe = False
        self.steps = self.drafted = self.accepted = 0
        self.per_pos = [0] * k

    @classmethod
    def for_params(cls, params, default_k: int = 0, numerics: str = "exact") -> "Speculator | None":
        """The speculator a request asks for (``num_speculative_tokens`` None: ``default_k``), on
        a model of ``numerics``."""
        k = params.num_speculative_tokens
        k = default_k if k is None else k
        if not k:
            return None
        return cls(k, params.prompt_lookup_min, params.prompt_lookup_max, numerics)

    # ---------------------------------------------------------------- when and how much

    def plan(self, batch: int = 1, rows: int | None = None) -> int:
        """How many drafts to ask for this step (0: not now), in a decode step of ``batch``
        sequences with ``rows`` rows planned so far (default ``batch``): the ``k`` that
        maximises the step's expected tokens per time, ``(batch - 1 + E(k)) / cost[rows + k]``
        against ``batch / cost[rows]``, if that gains MIN_GAIN; after a pause, a probe
        with the drafts that are cheapest per draft."""
        rows = batch if rows is None else rows
        cost = self.cost
        top = len(cost)
        if rows >= top:
            return 0
        if self.pause:
            self.pause -= 1
            if self.pause == 0:
                self.probe = True
            return 0
        ks = range(1, min(self.k_max, top - rows) + 1)
        if self.probe:
            return max(ks, key=lambda k: k / cost[rows + k - 1])
        a = self.acc / (self.acc + self.rej)
        base = batch / cost[rows - 1]
        best_k, best = 0, 0.0
        for k in ks:
            gain = (batch - 1 + expected_tokens(a, k)) / cost[rows + k - 1] / base
            if gain > best:
                best_k, best = k, gain
        if best < MIN_GAIN:
            self.pause = self.backoff
            self.backoff = min(2 * self.backoff, PAUSE_MAX)
            return 0
        self.backoff = PAUSE_MIN  # speculation pays: the next pause starts short again
        return best_k

    def draft(self, tokens: np.ndarray, n: int, room: int, batch: int = 1,
              rows: int | None = None) -> int:
        """Drafts for the sequence ``tokens[:n]`` into ``self.drafts``, at most ``room - 1`` (the
        step emits one token more than it accepts), in a step of ``batch`` sequences and
        ``rows`` rows so far; 0 = decode one token plainly."""
        k = min(self.plan(batch, rows), room - 1)
        if k <= 0:
            return 0
        return propose(tokens, n, self.min_n, self.max_n, k, self.drafts)

    def record(self, k: int, accepted: int) -> None:
        """A verify step of ``k`` drafts accepted ``accepted`` of them."""
        self.steps += 1
        self.drafted += k
        self.accepted += accepted
        for i in range(accepted):
            self.per_pos[i] += 1
        self.acc = DECAY * self.acc + accepted
        self.rej = DECAY * self.rej + (1.0 if accepted < k else 0.0)
        self.probe = False

    # ---------------------------------------------------------------- the acceptance rule

    def accept(self, policy, logits: np.ndarray, picks: np.ndarray, tokens: np.ndarray, n: int,
               k: int, texts: list | None = None) -> tuple[int, int, str | None]:
        """Verify ``k`` drafts of the sequence ``tokens[:n]`` against its rows' ``logits`` [k + 1]
        (``picks``: their argmax). Emitted tokens are written to ``tokens[n:]`` one by one, each
        checked by ``policy.finish_reason`` (nothing is emitted after a stop); ``texts`` gets
        each one's ``policy.text``. Returns (tokens emitted, drafts accepted, finish reason or
        None)."""
        drafts = self.drafts
        sampled = not policy.sampler.params.greedy
        emitted = accepted = 0
        reason = None
        for i in range(k + 1):
            hist = tokens[: n + i]
            if i < k:
                x = int(drafts[i])
                if sampled:
                    tok = self._sample_against(policy.sampler, logits[i], hist, x)
                else:
                    tok = policy.pick(logits[i], hist, picks[i])
            else:  # all drafts accepted: the bonus token from the last row
                x = -1
                tok = policy.pick(logits[i], hist, picks[i])
            tokens[n + i] = tok
            emitted += 1
            reason = policy.finish_reason(tok, n + i + 1)
            if texts is not None:
                texts.append(policy.text)
            if tok != x or reason is not None:
                if tok == x:
                    accepted += 1
                break
            accepted += 1
        self.record(k, min(accepted, k))
        return emitted, min(accepted, k), reason

    @staticmethod
    def _sample_against(sampler, logits: np.ndarray, history: np.ndarray, x: int) -> int:
        """Rejection sampling of a point-mass draft ``x``: x with probability p(x), else a draw
        from p without x (renormalised)."""
        cand, probs = sampler.distribution(logits, history)
        total = float(probs.sum(dtype=np.float64))
        hit = np.flatnonzero(cand == x)
        rng = sampler.rng
        if hit.size:
            j = int(hit[0])
            if rng.random() * total < float(probs[j]):
                return x
            probs = probs.copy()
            probs[j] = 0.0
            if not probs.any():  # p was all on x (cannot reject then); kept for safety
                return x
        return int(cand[_draw(probs, rng.random())])

