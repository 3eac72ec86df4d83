"""The Llama model: one forward step over a flat batch of tokens, and the Model that owns it.

`forward` is the whole decode/prefill step, one screen, in the spirit of llama2.c's run.c.
A step takes T tokens; each has a position and a sequence (a row of `block_tables`), so one
call serves a prompt chunk (T tokens of one sequence), a decode step (one token of each of B
sequences), or a mix. Logits are computed only for the rows the caller asks for.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import gguf
import numba
import numpy as np

from engine import cpu
from engine import kernels as K
from engine.config import NUMERICS, ModelConfig, UnsupportedModel
from engine.kv_cache import KVCache
from engine.tokenizer import Tokenizer
from engine.weights import Weights, load_weights, weight_bytes

log = logging.getLogger(__name__)

TUNED_BATCH_MAX = 64  # steps up to this many tokens use step_threads["batch"]; longer ones all threads


class Dims(NamedTuple):
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    rms_eps: float
    fast: bool  # numerics="fast": int8 activations in the quantized products


class Buffers(NamedTuple):
    """Every array a step writes, allocated once for the largest step."""

    x: np.ndarray  # residual stream [T, d_model]
    xn: np.ndarray  # normalized [T, d_model]
    qkv: np.ndarray  # [T, (n_heads + 2 n_kv) head_dim]
    att: np.ndarray  # attention output [T, d_model]
    tmp: np.ndarray  # projection output [T, d_model]
    gate_up: np.ndarray  # [T, 2 d_ffn]
    hidden: np.ndarray  # silu(gate) * up [T, d_ffn]
    head_in: np.ndarray  # rows that get logits [T, d_model]
    act: K.Act  # fast mode: a product's input quantized to int8 per 32-block
    wtiles: np.ndarray  # per-thread dequantized weight tile [threads, GEMM_TILE * max_cols]
    scores: np.ndarray  # per-thread attention scores [threads, context]


@K.jit
def forward(tokens, positions, token_seq, block_tables, logit_rows,
            w, rope_cos, rope_sin, k_cache, v_cache, dims, buf, logits):
    T, fast, wt, act = tokens.size, dims.fast, buf.wtiles, buf.act
    K.embed(w.embed, tokens, T, buf.x)
    for l in range(dims.n_layers):
        # attention block
        K.rmsnorm(buf.x, w.attn_norm[l], dims.rms_eps, T, buf.xn)
        K.matmul(w.qkv, l, buf.xn, T, buf.qkv, wt, act, fast)
        K.rope_and_store(buf.qkv, T, positions, token_seq, block_tables, l, k_cache, v_cache,
                         rope_cos, rope_sin, dims.n_heads, dims.n_kv_heads, dims.head_dim)
        K.attention(buf.qkv, T, positions, token_seq, block_tables, l, k_cache, v_cache,
                    dims.n_heads, dims.n_kv_heads, dims.head_dim, buf.scores, buf.att)
        K.matmul(w.wo, l, buf.att, T, buf.tmp, wt, act, fast)
        K.add_into(buf.x, buf.tmp, T)
        # feed-forward block
        K.rmsnorm(buf.x, w.ffn_norm[l], dims.rms_eps, T, buf.xn)
        K.matmul(w.gate_up, l, buf.xn, T, buf.gate_up, wt, act, fast)
        K.silu_mul(buf.gate_up, dims.d_ffn, T, buf.hidden)
        K.matmul(w.down, l, buf.hidden, T, buf.tmp, wt, act, fast)
        K.add_into(buf.x, buf.tmp, T)
    R = logit_rows.size
    for i in range(R):
        buf.head_in[i] = buf.x[logit_rows[i]]
    K.rmsnorm(buf.head_in, w.out_norm, dims.rms_eps, R, buf.xn)
    K.matmul(w.head, 0, buf.xn, R, logits, wt, act, fast)


def rope_tables(context: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(context, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class Model:
    """A loaded model, its paged KV cache and step buffers. Call it from one thread only."""

    def __init__(self, path: str | Path, *, max_batch: int = 64, kv_blocks: int | None = None,
                 block_size: int = 16, max_chunk: int = 512, threads: int | None = None,
                 numerics: str = "exact"):
        """numerics: "exact" (float32 activations; logits within ~1e-5 of a float64 forward)
        or "fast" (int8 activations per 32-block and integer dot products in the quantized
        products, as llama.cpp). Either way a sequence's logits do not depend on the batch."""
        if numerics not in NUMERICS:
            raise ValueError(f"numerics={numerics!r}: expected one of {', '.join(NUMERICS)}")
        self.numerics = numerics
        self.int8_kernel = cpu.ISA if numerics == "fast" else ""  # "vnni" or "portable": same bits
        if threads:
            numba.set_num_threads(threads)
        # Threads per step, by its size (tune_threads measures them): a decode step of a few
        # tokens makes ~150 parallel launches whose fork/join can cost more than a second
        # thread gains. Results do not depend on it (each row's arithmetic is fixed).
        self.threads = numba.get_num_threads()
        self.step_threads = {"few": self.threads, "batch": self.threads}
        t0 = time.perf_counter()
        self.path = Path(path)
        reader = gguf.GGUFReader(self.path)
        self.config = cfg = ModelConfig.from_gguf(reader)
        self.tokenizer = Tokenizer.from_gguf(reader)
        self.weights: Weights = load_weights(reader, cfg)
        del reader
        for name, value in (("head_dim", cfg.head_dim), ("feed_forward_length", cfg.d_ffn),
                            ("block_size", block_size)):
            if value % 16:  # the vector kernels work sixteen lanes at a time
                raise UnsupportedModel(f"{name}={value} is not a multiple of 16")
        self.max_batch = max_batch
        self.max_chunk = max(max_chunk, max_batch)
        self.dims = Dims(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ffn, cfg.rms_eps,
                         numerics == "fast")
        self.rope_cos, self.rope_sin = rope_tables(cfg.context_length, cfg.head_dim, cfg.rope_base)
        self.max_blocks_per_seq = -(-cfg.context_length // block_size)
        if kv_blocks is None:
            kv_blocks = max(4 * self.max_blocks_per_seq, 2048)
        self.kv = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv_blocks, block_size)
        self.buffers = self._buffers(self.max_chunk)
        self._logits = np.zeros((max_batch, cfg.vocab_size), dtype=np.float32)
        self.picks = np.zeros(max_batch, dtype=np.int64)  # each row's argmax, last call
        self._row_logits = np.zeros((0, cfg.vocab_size), dtype=np.float32)  # decode_rows', grown
        self._row_picks = np.zeros(0, dtype=np.int64)
        self._rows = np.arange(self.max_chunk, dtype=np.int32)
        self._zeros = np.zeros(self.max_chunk, dtype=np.int32)
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s (%s, %d layers) in %.2fs", self.path.name, cfg.quantization,
                 cfg.n_layers, self.load_seconds)

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Model":
        """Model(path, ...) under the name the server uses."""
        return cls(path, **kw)

    def _buffers(self, T: int) -> Buffers:
        cfg = self.config
        w = self.weights
        max_cols = max(m.cols for m in (w.qkv, w.wo, w.gate_up, w.down, w.head))
        threads = numba.config.NUMBA_NUM_THREADS
        f = lambda *shape: np.zeros(shape, dtype=np.float32)  # noqa: E731
        return Buffers(
            x=f(T, cfg.d_model), xn=f(T, cfg.d_model), qkv=f(T, w.qkv.rows),
            att=f(T, cfg.d_model), tmp=f(T, cfg.d_model), gate_up=f(T, 2 * cfg.d_ffn),
            hidden=f(T, cfg.d_ffn), head_in=f(T, cfg.d_model),
            act=K.Act(np.zeros((T, max_cols), np.int8), f(T, 8 * max_cols // K.BLOCK),
                      f(T, 4 * max_cols // K.BLOCK)),
            wtiles=f(threads, K.GEMM_TILE * max_cols),
            scores=f(threads, cfg.context_length),
        )

    # -- the step ----------------------------------------------------------------------------

    def _step(self, tokens, positions, token_seq, block_tables, logit_rows, logits):
        T = tokens.size
        if T and not 0 <= tokens.min() <= tokens.max() < self.config.vocab_size:
            # the embedding lookup does not bounds-check: an id past the vocabulary reads
            # whatever memory follows the table (NaN logits, a ZeroDivisionError in attention)
            bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.config.vocab_size}")
        numba.set_num_threads(self.step_threads["few"] if T <= K.GEMV_MAX_TOKENS else
                              self.step_threads["batch"] if T <= TUNED_BATCH_MAX else self.threads)
        forward(tokens, positions, token_seq, block_tables, logit_rows, self.weights,
                self.rope_cos, self.rope_sin, self.kv.k, self.kv.v,
                self.dims, self.buffers, logits)

    def decode(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray) -> np.ndarray:
        """One token for each of B sequences -> logits [B, vocab] (valid until the next call);
        ``picks[:B]`` holds each row's argmax (the greedy choice: one numpy call for the batch)."""
        B = tokens.shape[0]
        if B > self.max_batch:
            raise ValueError(f"batch of {B} exceeds max_batch={self.max_batch}")
        logits = self._logits[:B]
        self._step(np.ascontiguousarray(tokens, np.int32), np.ascontiguousarray(positions, np.int32),
                   self._rows[:B], np.ascontiguousarray(block_tables, np.int32), self._rows[:B], logits)
        np.argmax(logits, axis=1, out=self.picks[:B])
        return logits

    def decode_rows(self, tokens: np.ndarray, positions: np.ndarray, token_seq: np.ndarray,
                    block_tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A decode step whose sequences may feed several rows (speculative verification: a
        sequence's last token and its drafts at consecutive positions, ``token_seq`` naming each
        row's block table). Every row's K/V is stored before any row attends, so a row sees the
        rows of its sequence before it. Returns (logits [T, vocab], argmax [T]), valid until the
        next call; a row's logits are those a one-row decode would give (batch invariance)."""
        T = tokens.shape[0]
        if T > self.max_chunk:
            raise ValueError(f"{T} rows exceed max_chunk={self.max_chunk}")
        if self._row_logits.shape[0] < T:
            self._row_logits = np.zeros((T, self.config.vocab_size), dtype=np.float32)
            self._row_picks = np.zeros(T, dtype=np.int64)
        logits, picks = self._row_logits[:T], self._row_picks[:T]
        self._step(tokens, positions, token_seq, block_tables, self._rows[:T], logits)
        np.argmax(logits, axis=1, out=picks)
        return logits, picks

    def prefill(self, tokens: np.ndarray, block_table: np.ndarray, start_pos: int = 0,
                all_logits: bool = False) -> np.ndarray:
        """Run a prompt (in chunks of max_chunk) from start_pos; its KV goes into block_table's
        blocks. Returns the last token's logits [vocab], or [n, vocab] with all_logits;
        ``picks[0]`` holds the last token's argmax (the greedy choice, as decode's)."""
        tokens = np.ascontiguousarray(tokens, np.int32)
        n = tokens.size
        if n == 0:
            raise ValueError("prefill needs at least one token")
        if start_pos + n > self.config.context_length:
            raise ValueError(f"{start_pos + n} tokens exceed the context of {self.config.context_length}")
        table = np.ascontiguousarray(block_table, np.int32).reshape(1, -1)
        if table.shape[1] * self.kv.block_size < start_pos + n:
            raise ValueError(f"block table of {table.shape[1]} blocks cannot hold {start_pos + n} tokens")
        out = np.empty((n, self.config.vocab_size), np.float32) if all_logits else None
        for c0 in range(0, n, self.max_chunk):
            c1 = min(n, c0 + self.max_chunk)
            chunk = tokens[c0:c1]
            positions = np.arange(start_pos + c0, start_pos + c1, dtype=np.int32)
            if all_logits:
                rows, logits = self._rows[: c1 - c0], out[c0:c1]
            else:
                rows, logits = self._rows[c1 - c0 - 1 : c1 - c0], self._logits[:1]
            self._step(chunk, positions, self._zeros[: c1 - c0], table, rows, logits)
        last = out[-1:] if all_logits else self._logits[:1]
        np.argmax(last, axis=1, out=self.picks[:1])
        return out if all_logits else self._logits[0]

    # -- conveniences --------------------------------------------------------------------------

    def logits(self, tokens) -> np.ndarray:
        """Teacher-forced logits [n, vocab] for a token sequence, in a temporary sequence."""
        tokens = np.asarray(tokens, np.int32)
        blocks = self.kv.allocator.allocate(self.kv.blocks_for(tokens.size))
        try:
            return self.prefill(tokens, np.array(blocks, np.int32), 0, all_logits=True)
        finally:
            self.kv.allocator.free(blocks)

    def warmup(self, tune: bool = True) -> float:
        """Compile (or load from Numba's cache) every kernel path a server will hit: a prompt
        long enough for the matrix path, and decode steps of 1 and 4 sequences; then (tune)
        choose the threads for decode steps by measuring them (tune_threads)."""
        t0 = time.perf_counter()
        n = K.GEMV_MAX_TOKENS + 1
        blocks = self.kv.allocator.allocate(self.kv.blocks_for(n + 1))
        try:
            table = np.array(blocks, np.int32)
            self.prefill(np.ones(n, np.int32), table, 0)
            for batch in (1, min(4, self.max_batch)):
                self.decode(np.ones(batch, np.int32), np.full(batch, n, np.int32),
                            np.repeat(table[None], batch, axis=0))
            if tune:
                self.tune_threads(table, n)
        finally:
            self.kv.allocator.free(blocks)
        return time.perf_counter() - t0

    def tune_threads(self, table: np.ndarray, position: int, rounds: int = 3) -> dict[str, int]:
        """For a step of one token ("few") and of min(16, max_batch) ("batch"), time 1 thread
        against all, in alternating rounds, and keep the faster (best of each). WAFER_STEP_THREADS
        forces a count. Logged; also in ``step_threads``."""
        forced = os.environ.get("WAFER_STEP_THREADS", "").strip()
        if forced:
            n = max(1, min(int(forced), self.threads))
            self.step_threads = {"few": n, "batch": n}
            return self.step_threads
        if self.threads == 1:
            return self.step_threads
        for kind, batch in (("few", 1), ("batch", min(16, self.max_batch))):
            if kind == "batch" and batch <= K.GEMV_MAX_TOKENS:
                continue
            args = (np.ones(batch, np.int32), np.full(batch, position, np.int32),
                    np.repeat(table[None], batch, axis=0))
            best = {1: float("inf"), self.threads: float("inf")}
            for r in range(2 * rounds):
                count = (1, self.threads)[r % 2]
                self.step_threads[kind] = count
                for _ in range(5):
                    t = time.perf_counter()
                    self.decode(*args)
                    best[count] = min(best[count], time.perf_counter() - t)
            self.step_threads[kind] = min(best, key=best.get)
            log.info("%s steps (%d tokens): %d thread(s) (best %.2f ms with 1, %.2f ms with %d)", kind,
                     batch, self.step_threads[kind], best[1] * 1e3, best[self.threads] * 1e3, self.threads)
        return self.step_threads

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights a single-sequence decode step reads (embedding: one row)."""
        w = self.weights
        emb_row = weight_bytes(w.embed) // w.embed.rows
        return sum(weight_bytes(m) for m in (w.qkv, w.wo, w.gate_up, w.down, w.head)) + emb_row

    def macs_per_token(self, with_head: bool = True) -> int:
        """Multiply-adds of the weight products for one token (attention excluded)."""
        w = self.weights
        layers = self.config.n_layers * sum(m.rows * m.cols for m in (w.qkv, w.wo, w.gate_up, w.down))
        return layers + (w.head.rows * w.head.cols if with_head else 0)
