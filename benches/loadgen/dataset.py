"""What the load generator sends: random prompts of exact token lengths, or a JSONL dataset.

Random prompts are raw token ids (``token_ids`` input, no chat template) drawn uniformly from the
middle of the vocabulary (away from special tokens, which sit at either end in the usual
tokenizers), so the input length is exact; the output length is asked for with max_tokens. The
wafer.v1 API has no ignore_eos, so a model may stop early: the report counts the tokens it got.
Lengths are drawn uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)] (vLLM's
--random-range-ratio); 0 gives every request the same length.

A dataset file is JSONL, one request a line: ``{"messages": [{"role": "user", "content": "..."}],
"max_tokens": 64}`` (max_tokens optional: else --output-len, else the server's default). Lines
are used in order (shuffled with --seed when --shuffle), cycling when more prompts are asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Prompt:
    index: int
    input: dict[str, Any]          # {"token_ids": [...]} or {"messages": [...]}
    max_tokens: int | None = None
    input_len: int = 0             # known before sending (random prompts); else the server's count


def lengths(n: int, mean: int, range_ratio: float, rng: np.random.Generator) -> list[int]:
    if mean < 1:
        raise ValueError(f"length {mean} must be at least 1")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio={range_ratio} must be in [0, 1)")
    lo, hi = max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n).tolist()


def safe_id_range(vocab_size: int) -> tuple[int, int]:
    """[lo, hi) of token ids random prompts use: the vocabulary without its first and last
    ~1000 ids (special and control tokens)."""
    margin = min(1000, vocab_size // 8)
    return margin, vocab_size - margin


def random_prompts(n: int, input_len: int, output_len: int, vocab_size: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    ins = lengths(n, input_len, range_ratio, rng)
    outs = lengths(n, output_len, range_ratio, rng)
    lo, hi = safe_id_range(vocab_size)
    return [Prompt(i, {"token_ids": rng.integers(lo, hi, size=k).tolist()}, m, k)
            for i, (k, m) in enumerate(zip(ins, outs))]


def load_jsonl(path: str | Path, n: int, output_len: int | None = None, shuffle: bool = False,
               seed: int = 0) -> list[Prompt]:
    """n prompts from a JSONL file of {"messages": [...], "max_tokens": N?}; ValueError naming
    the line that is not one."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise ValueError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        mt = row.get("max_tokens", output_len)
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool)):
            raise ValueError(f"{where}: max_tokens={mt!r} must be an integer")
        rows.append(({"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}, mt))
    if not rows:
        raise ValueError(f"{path}: no requests in the file")
    order = np.random.default_rng(seed).permutation(len(rows)) if shuffle else np.arange(len(rows))
    return [Prompt(i, *rows[order[i % len(rows)]]) for i in range(n)]
