"""Single-stream generation on a local Model: prefill the prompt, then decode token by token.

This is the plain path behind `wafer generate --model ...`; the server batches many streams
through engine/scheduler/ instead. Both choose tokens and decide when to stop with the same
:class:`engine.sampling.StreamPolicy`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from engine.model import Model
from engine.sampling import SamplingParams, StreamPolicy, logprobs_topn
from engine.scheduler.speculate import Speculator


@dataclass
class GeneratedToken:
    id: int
    text: str  # text that became final with this token (may be "" while UTF-8 or a stop string is pending)
    index: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0  # prompt in -> first token out
    decode_s: float = 0.0  # first token out -> last token out
    finish_reason: str = ""
    # speculative decoding (params.num_speculative_tokens > 0): verify steps, drafts, accepted
    spec_steps: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts per draft token."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step (accepted drafts + the correction or bonus token), as vLLM's."""
        return 1.0 + self.spec_accepted_tokens / self.spec_steps if self.spec_steps else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Generation:
    """Iterate to stream tokens; `stats` is complete once iteration ends."""

    def __init__(self, model: Model, prompt_ids: list[int], params: SamplingParams):
        params.validate(model.config.vocab_size, model.config.context_length, len(prompt_ids))
        if not prompt_ids:
            raise ValueError("prompt is empty")
        self.model = model
        self.prompt = np.asarray(prompt_ids, dtype=np.int32)
        self.params = params
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))

    def __iter__(self) -> Iterator[GeneratedToken]:
        model, params, stats = self.model, self.params, self.stats
        kv = model.kv
        n_total = self.prompt.size + params.max_tokens
        blocks = kv.allocator.allocate(kv.blocks_for(n_total))
        table = np.array(blocks, dtype=np.int32).reshape(1, -1)
        policy = StreamPolicy(params, model.config.vocab_size, model.tokenizer,
                              model.tokenizer.eos_id, end=n_total, text=True)
        history = np.empty(n_total, dtype=np.int32)
        history[: self.prompt.size] = self.prompt
        n = self.prompt.size
        spec = Speculator.for_params(params, numerics=model.numerics)
        k_max = spec.k_max if spec else 0
        rows_tok = np.zeros(k_max + 1, np.int32)
        rows_pos = np.zeros(k_max + 1, np.int32)
        rows_seq = np.zeros(k_max + 1, np.int32)
        try:
            t0 = time.perf_counter()
            logits = model.prefill(self.prompt, table[0], 0)[None]
            picks = model.picks[:1]
            k = 0  # drafts verified by the step that made `logits`
            t_first = None
            while True:
                if k:  # a verify step: accepted drafts and the correction or bonus, stops checked
                    texts: list[str] = []
                    m, acc, finish = spec.accept(policy, logits, picks, history, n, k, texts)
                    new = history[n : n + m].tolist()
                    stats.spec_steps += 1
                    stats.spec_draft_tokens += k
                    stats.spec_accepted_tokens += acc
                else:
                    tok = policy.pick(logits[0], history[:n])
                    history[n] = tok
                    new = [tok]
                    finish = policy.finish_reason(tok, n + 1)  # the stream with tok appended
                    texts = [policy.text]
                now = time.perf_counter()
                if t_first is None:
                    t_first = now
                    stats.ttft_s = now - t0
                stats.decode_s = now - t_first
                for j, tok in enumerate(new):
                    lp, top = (logprobs_topn(logits[j], tok, params.logprobs) if params.logprobs
                               else (None, []))
                    stats.completion_tokens += 1
                    n += 1
                    yield GeneratedToken(tok, texts[j], stats.completion_tokens - 1, lp, top)
                if finish:
                    stats.finish_reason = finish
                    return
                k = spec.draft(history, n, n_total - n) if spec else 0
                rows_tok[0], rows_pos[0] = history[n - 1], n - 1
                if k:
                    rows_tok[1 : k + 1] = spec.drafts[:k]
                    rows_pos[1 : k + 1] = np.arange(n, n + k)
                logits, picks = model.decode_rows(rows_tok[: k + 1], rows_pos[: k + 1],
                                                  rows_seq[: k + 1], table)
        finally:
            kv.allocator.free(blocks)
            if not stats.finish_reason:
                stats.finish_reason = "cancelled"


def prompt_ids(model: Model, prompt: str, raw: bool = False) -> list[int]:
    """A user prompt as ids: through the chat template unless raw."""
    tok = model.tokenizer
    if raw:
        return tok.encode(prompt)
    return tok.encode_chat([{"role": "user", "content": prompt}])
