"""Choosing the next token, and knowing when to stop.

Order of the logit processors (as in llama.cpp and Hugging Face): repetition penalty,
temperature (0 = greedy), top-k, softmax, top-p, min-p; then a draw from a generator seeded
per request, so a seed makes a completion reproducible.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from engine import kernels as K
from engine.tokenizer import IncrementalDecoder, Tokenizer

FINISH_STOP = "stop"      # EOS, a stop token id, or a stop string
FINISH_LENGTH = "length"  # max_tokens (or the model's context) reached

# Logits more than this below the maximum (after temperature) have probability < e^-30
# relative to the top token: they cannot change a float32 softmax, so they are dropped early.
NEGLIGIBLE_LOGIT_GAP = 30.0


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int = 0  # how many top alternatives to report per token
    ignore_eos: bool = False
    # speculative decoding by prompt lookup (engine/scheduler/speculate.py): drafts per step
    # (0 = off, None = the server's default) and the n-gram lengths looked up
    num_speculative_tokens: int | None = 0
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5

    MAX_LOGPROBS = 20
    MAX_STOP_STRINGS = 16
    MAX_STOP_CHARS = 256
    MAX_STOP_TOKEN_IDS = 256
    MAX_SPECULATIVE_TOKENS = 16
    MAX_PROMPT_LOOKUP = 16

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int, context_length: int, prompt_len: int = 0) -> None:
        """Raise ValueError naming the field, its value and the limit (the server's
        INVALID_ARGUMENT messages are these)."""
        def bad(msg):
            raise ValueError(msg)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                bad(f"{name}={getattr(self, name)} must be a finite number")
        # .9g: a float32 just past a bound (top_p=1.0000001) is not printed rounded into it
        if not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature={self.temperature:.9g} must be in [0, 100] (0 = greedy)")
        if not 0 <= self.top_k <= vocab_size:
            bad(f"top_k={self.top_k} must be in [0, {vocab_size}] (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p={self.top_p:.9g} must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p={self.min_p:.9g} must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad(f"repetition_penalty={self.repetition_penalty:.9g} must be in (0, 10]")
        if self.max_tokens < 1:
            bad(f"max_tokens={self.max_tokens} must be at least 1")
        if prompt_len + self.max_tokens > context_length:
            bad(f"max_tokens={self.max_tokens} exceeds the model's context of {context_length} "
                f"(prompt {prompt_len} tokens + max_tokens {self.max_tokens} > {context_length}; "
                f"at most {max(0, context_length - prompt_len)})")
        if not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            bad(f"logprobs={self.logprobs} must be in [0, {self.MAX_LOGPROBS}]")
        if len(self.stop) > self.MAX_STOP_STRINGS:
            bad(f"stop: {len(self.stop)} strings, limit {self.MAX_STOP_STRINGS}")
        for i, s in enumerate(self.stop):
            if not s:
                bad(f"stop[{i}] is empty")
            if len(s) > self.MAX_STOP_CHARS:
                bad(f"stop[{i}] has {len(s)} characters, limit {self.MAX_STOP_CHARS}")
        if len(self.stop_token_ids) > self.MAX_STOP_TOKEN_IDS:
            bad(f"stop_token_ids: {len(self.stop_token_ids)} ids, limit {self.MAX_STOP_TOKEN_IDS}")
        for i, t in enumerate(self.stop_token_ids):
            if not 0 <= t < vocab_size:
                bad(f"stop_token_ids[{i}]={t} is outside the vocabulary [0, {vocab_size})")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            bad(f"seed={self.seed} must be in [0, 2^64)")
        k = self.num_speculative_tokens
        if k is not None and not 0 <= k <= self.MAX_SPECULATIVE_TOKENS:
            bad(f"num_speculative_tokens={k} must be in [0, {self.MAX_SPECULATIVE_TOKENS}] (0 = off)")
        if not 1 <= self.prompt_lookup_max <= self.MAX_PROMPT_LOOKUP:
            bad(f"prompt_lookup_max={self.prompt_lookup_max} must be in [1, {self.MAX_PROMPT_LOOKUP}]")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            bad(f"prompt_lookup_min={self.prompt_lookup_min} must be in [1, prompt_lookup_max="
                f"{self.prompt_lookup_max}]")


class Sampler:
    """Draws tokens for one sequence with its own random generator (work buffers are per thread)."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self._rng: np.random.Generator | None = None  # made on first use: greedy never needs one

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.params.seed)
        return self._rng

    def sample(self, logits: np.ndarray, history: np.ndarray | None = None) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(self._penalized(logits, history)))
        cand, probs = self.distribution(logits, history)
        return int(cand[_draw(probs, self.rng.random())])

    def _penalized(self, logits: np.ndarray, history: np.ndarray | None) -> np.ndarray:
        p = self.params
        work = _scratch(self.vocab_size)[0]
        np.copyto(work, logits[: work.size])
        if p.repetition_penalty != 1.0 and history is not None and len(history):
            seen = np.unique(history)
            v = work[seen]
            work[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        return work

    def distribution(self, logits: np.ndarray, history: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The distribution :meth:`sample` draws from (temperature > 0): candidate ids and their
        unnormalised probabilities (views of per-thread buffers, valid until the next call).
        Speculative decoding's rejection rule uses it, so its output follows the same law."""
        p = self.params
        work = self._penalized(logits, history)
        cand, probs = _scratch(self.vocab_size)[1:]
        work /= p.temperature
        top = work.max()
        # candidates within the gap of the best, with unnormalised probabilities (the best has
        # 1.0; float32 holds every ratio down to e^-30 with 7 significant digits)
        n = K.softmax_candidates(work, np.float32(top - NEGLIGIBLE_LOGIT_GAP), np.float32(top), cand, probs)
        cand, probs = cand[:n], probs[:n]
        if 0 < p.top_k < n:
            best = np.argpartition(-probs, p.top_k - 1)[: p.top_k]
            cand, probs = cand[best], probs[best]
        if p.top_p < 1.0:
            cand, probs = _top_p(cand, probs, p.top_p)
        if p.min_p > 0.0:
            keep = probs >= p.min_p  # relative to the best token's probability (1.0 here)
            cand, probs = cand[keep], probs[keep]
        return cand, probs


_thread_scratch = threading.local()


def _scratch(vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Work buffers for one sample() call: one set per thread (a thread samples one row at a
    time), so sampling allocates nothing per token and nothing per sequence."""
    s = getattr(_thread_scratch, "buffers", None)
    if s is None or s[0].size != vocab_size:
        s = (np.empty(vocab_size, np.float32), np.empty(vocab_size, np.int32),
             np.empty(vocab_size + 16, np.float32))
        _thread_scratch.buffers = s
    return s


DRAW_CHUNK = 1024


def _draw(probs: np.ndarray, u: float) -> int:
    """Index i where u * total mass falls in the cumulative mass: one uniform draw, no sort.
    The running sum is taken only inside the chunk the draw lands in (chunk sums find it)."""
    n = probs.size
    if n <= DRAW_CHUNK:
        cum = np.cumsum(probs, dtype=np.float64)
        return min(int(np.searchsorted(cum, u * cum[-1], side="right")), n - 1)
    chunk_mass = np.cumsum(np.add.reduceat(probs, np.arange(0, n, DRAW_CHUNK), dtype=np.float64))
    target = u * chunk_mass[-1]
    j = min(int(np.searchsorted(chunk_mass, target, side="right")), chunk_mass.size - 1)
    before = chunk_mass[j - 1] if j else 0.0
    cum = np.cumsum(probs[j * DRAW_CHUNK : (j + 1) * DRAW_CHUNK], dtype=np.float64) + before
    i = min(int(np.searchsorted(cum, target, side="right")), cum.size - 1)
    return j * DRAW_CHUNK + i


def _top_p(cand: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most likely tokens whose mass reaches top_p (at least one token).
    Sorts only as many candidates as needed: the 64 most likely, then 512, ... ."""
    total = probs.sum()
    k = 64
    while True:
        k = min(k, cand.size)
        idx = np.argpartition(-probs, k - 1)[:k] if k < cand.size else np.arange(cand.size)
        idx = idx[np.argsort(-probs[idx], kind="stable")]
        mass = np.cumsum(probs[idx]) / total
        if mass[-1] >= top_p or k == cand.size:
            n = min(k, int(np.searchsorted(mass, top_p)) + 1)
            return cand[idx[:n]], probs[idx[:n]]
        k *= 8


def logprobs_topn(logits: np.ndarray, token_id: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of token_id under the model's raw distribution, and the n most likely."""
    top = float(logits.max())
    log_z = top + float(np.log(np.exp(logits - top, dtype=np.float64).sum()))
    chosen = float(logits[token_id]) - log_z
    if n <= 0:
        return chosen, []
    ids = np.argpartition(-logits, n - 1)[:n]
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    return chosen, [(int(i), float(logits[i]) - log_z) for i in ids]


@dataclass
class StopChecker:
    """Turns a sequence's tokens into text deltas and decides when it is finished.

    Finish reasons: "stop" (EOS, a stop token id, or a stop string, which is not emitted) and
    "length" (max_tokens). Text that might be the start of a stop string is held back until it
    is known not to be one, so a client never sees part of a stop string.
    """

    params: SamplingParams
    tokenizer: Tokenizer
    eos_id: int | None = None
    n_tokens: int = 0
    _held: str = ""
    _decoder: IncrementalDecoder = field(init=False)

    def __post_init__(self):
        self._decoder = IncrementalDecoder(self.tokenizer)
        self._stop_ids = stop_token_ids(self.params, self.eos_id)

    def push(self, token_id: int) -> tuple[str, str | None]:
        self.n_tokens += 1
        if token_id in self._stop_ids:
            return self._held + self._decoder.flush(), FINISH_STOP
        text = self._held + self._decoder.push(token_id)
        self._held = ""
        stops = self.params.stop
        if stops:
            cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                return text[:cut], FINISH_STOP
        if self.n_tokens >= self.params.max_tokens:
            return text + self._decoder.flush(), FINISH_LENGTH
        if stops:
            hold = max((k for s in stops for k in range(1, min(len(s), len(text) + 1))
                        if text.endswith(s[:k])), default=0)
            if hold:
                text, self._held = text[:-hold], text[-hold:]
        return text, None

    def flush(self) -> str:
        """Text still held back when a sequence ends for another reason (cancel, context full)."""
        text, self._held = self._held + self._decoder.flush(), ""
        return text


def stop_token_ids(params: SamplingParams, eos_id: int | None) -> frozenset[int]:
    """The ids that end a stream: the requested stop ids, and EOS unless ``ignore_eos``."""
    ids = set(params.stop_token_ids)
    if eos_id is not None and not params.ignore_eos:
        ids.add(eos_id)
    return frozenset(ids)


class StreamPolicy:
    """The one place that chooses a stream's next token and decides whether it ends the stream:
    the single-stream :class:`engine.generate.Generation` and the scheduler (every sequence's
    turn) both use it, so their outputs and finish reasons are the same.

    - :meth:`pick`: the next token (the model's own argmax when the caller has it and the
      params are plain greedy; otherwise the :class:`Sampler`).
    - :meth:`finish_reason`, after the token joined the stream of ``n_tokens``: FINISH_STOP (EOS,
      a stop token id, a stop string), FINISH_LENGTH once the stream holds ``end`` tokens
      (prompt + max_tokens, capped by the context), else None.

    Stop strings need text: with stop strings (or ``text=True``) a :class:`StopChecker`
    detokenizes, and :attr:`text` is what the last token made final. Without them no text is
    made (the scheduler's hot path: its consumers detokenize on their side).
    """

    __slots__ = ("sampler", "greedy", "stop_ids", "n_logprobs", "stopper", "end", "text")

    def __init__(self, params: SamplingParams, vocab_size: int, tokenizer: Tokenizer,
                 eos_id: int | None, end: int, text: bool = False):
        self.sampler = Sampler(params, vocab_size)
        self.greedy = params.temperature == 0.0 and params.repetition_penalty == 1.0
        self.stop_ids = stop_token_ids(params, eos_id)
        self.n_logprobs = int(getattr(params, "logprobs", 0) or 0)
        self.stopper = StopChecker(params, tokenizer, eos_id) if text or params.stop else None
        self.end = end
        self.text = ""

    def pick(self, logits: np.ndarray, history: np.ndarray, argmax: int | None = None) -> int:
        """The next token given the logits and the stream so far (for the repetition penalty)."""
        if argmax is not None and self.greedy:
            return int(argmax)
        return int(self.sampler.sample(logits, history))

    def finish_reason(self, token_id: int, n_tokens: int) -> str | None:
        """Whether ``token_id``, just appended (the stream now holds ``n_tokens``), ends it."""
        if self.stopper is not None:
            self.text, reason = self.stopper.push(token_id)
        elif token_id in self.stop_ids:
            reason = FINISH_STOP
        else:
            reason = None
        if reason is None and n_tokens >= self.end:
            reason = FINISH_LENGTH
        return reason
