"""Engine throughput on the real model: decode (1 stream), prefill (512 tokens), batched decode
(B=16), each with bytes of weights read per token and achieved GB/s next to the read bandwidth
measured in the same run; cold/warm JIT start; llama.cpp on the same file when installed, in
alternating rounds with our engine; the scheduler's own time between two decode calls (the part of
the serving bench's per-token overhead that is engine bookkeeping, not serving); and encoding a
re-sent chat conversation (cached pieces vs encoding the whole rendered prompt)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from benches.conftest import REPORT, measure_read_bandwidth
from engine.model import Model

THREADS = int(os.environ.get("WAFER_THREADS", "2"))
CONTEXT = 64  # decode steps run at this context length
PREFILL = 512
BATCH = 16


@pytest.fixture(scope="module")
def model(model_path):
    m = Model(model_path, max_batch=BATCH, threads=THREADS)
    m.warmup()
    return m


def _sequence(model, n_tokens):
    blocks = model.kv.allocator.allocate(model.kv.blocks_for(n_tokens))
    return blocks, np.array(blocks, np.int32)


@pytest.fixture(scope="module")
def weights_bandwidth_gbs(model):
    """The same parallel sum over a buffer the size of the weights: the rate those bytes can be
    read at here (from the cache, where a machine's last-level cache holds them)."""
    gbs = measure_read_bandwidth(model.weight_bytes_per_token())
    REPORT["weights-sized read"] = {"GB/s": round(gbs, 2),
                                    "buffer_MB": round(model.weight_bytes_per_token() / 1e6, 1)}
    return gbs


def _row(model, tok_s, bandwidth, per_token_bytes=None, macs=None, weights_bandwidth=None):
    per_token_bytes = per_token_bytes or model.weight_bytes_per_token()
    macs = macs or model.macs_per_token()
    gbs = tok_s * per_token_bytes / 1e9
    row = {"tok/s": round(tok_s, 1), "GMAC/s": round(tok_s * macs / 1e9, 2),
           "weight_MB/token": round(per_token_bytes / 1e6, 1), "GB/s": round(gbs, 2),
           "of_read_bw": round(gbs / bandwidth, 3)}  # fractions: machine-readable in the JSON
    if weights_bandwidth:
        row["of_weights_sized_read"] = round(gbs / weights_bandwidth, 3)
    return row


def test_decode_one_stream(benchmark, model, read_bandwidth_gbs, weights_bandwidth_gbs):
    blocks, table = _sequence(model, CONTEXT + 1)
    prompt = np.arange(1, CONTEXT + 1, dtype=np.int32)
    model.prefill(prompt, table, 0)
    tok, pos, tables = np.array([42], np.int32), np.array([CONTEXT], np.int32), table[None]
    benchmark.pedantic(model.decode, args=(tok, pos, tables), rounds=60, warmup_rounds=5)
    model.kv.allocator.free(blocks)
    tok_s = 1.0 / benchmark.stats.stats.median
    REPORT["decode B=1"] = row = _row(model, tok_s, read_bandwidth_gbs,
                                      weights_bandwidth=weights_bandwidth_gbs)
    benchmark.extra_info.update(row)


def test_prefill_512(benchmark, model, read_bandwidth_gbs):
    blocks, table = _sequence(model, PREFILL)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, PREFILL).astype(np.int32)
    benchmark.pedantic(model.prefill, args=(prompt, table, 0), rounds=3, warmup_rounds=1)
    model.kv.allocator.free(blocks)
    tok_s = PREFILL / benchmark.stats.stats.median
    # weights are read once per 512-token step
    # only the last token of the prompt goes through the output head
    head_macs = model.macs_per_token() - model.macs_per_token(with_head=False)
    macs = model.macs_per_token(with_head=False) + head_macs / PREFILL
    row = _row(model, tok_s, read_bandwidth_gbs, model.weight_bytes_per_token() / PREFILL, macs)
    REPORT["prefill 512"] = row
    benchmark.extra_info.update(row)


def test_batched_decode_16(benchmark, model, read_bandwidth_gbs):
    tables = np.zeros((BATCH, model.kv.blocks_for(CONTEXT + 1)), np.int32)
    owned = []
    for i in range(BATCH):
        blocks, table = _sequence(model, CONTEXT + 1)
        owned.append(blocks)
        tables[i] = table
        model.prefill(np.arange(1, CONTEXT + 1, dtype=np.int32) + i, table, 0)
    toks = np.full(BATCH, 42, np.int32)
    pos = np.full(BATCH, CONTEXT, np.int32)
    benchmark.pedantic(model.decode, args=(toks, pos, tables), rounds=20, warmup_rounds=2)
    for blocks in owned:
        model.kv.allocator.free(blocks)
    tok_s = BATCH / benchmark.stats.stats.median
    row = _row(model, tok_s, read_bandwidth_gbs, model.weight_bytes_per_token() / BATCH)
    if "prefill 512" in REPORT:
        row["vs_prefill"] = round(tok_s / REPORT["prefill 512"]["tok/s"], 2)
    REPORT[f"decode B={BATCH} (aggregate)"] = row
    benchmark.extra_info.update(row)


START_SCRIPT = """
import time, json, sys
t0 = time.perf_counter()
from engine.model import Model
m = Model(sys.argv[1], max_batch=1, threads={threads})
t1 = time.perf_counter()
m.warmup()
t2 = time.perf_counter()
print(json.dumps({{"load_s": t1 - t0, "jit_s": t2 - t1}}))
"""


def test_scheduler_gap_between_decodes(benchmark, model):
    """The continuous-batching loop on the real model, no gRPC: the time from one decode call's
    return to the next call (choosing tokens, finish checks, block growth, publishing), at one
    sequence and at 16. It runs with caches the model call has just flushed."""
    from engine.sampling import SamplingParams
    from engine.scheduler import FinishEvent, Request, Scheduler, SchedulerConfig

    calls = []
    decode = model.decode

    def timed_decode(*args):
        t0 = time.perf_counter_ns()
        out = decode(*args)
        calls.append((t0, time.perf_counter_ns(), len(args[0])))
        return out

    done = []
    sched = Scheduler(model, SchedulerConfig(max_batch=BATCH),
                      publish=lambda items, quiet: done.extend(
                          1 for _, ev in items if isinstance(ev, FinishEvent)))
    gaps = {1: [], BATCH: []}

    def run():  # one stream, then 16 at once; the benchmark's time is the whole of it
        for n in (1, BATCH):
            calls.clear()
            done.clear()
            for i in range(n):
                sched.submit(Request(model.tokenizer.encode(f"Story {i}: once upon a time there was"),
                                     SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)))
            for _ in range(5000):  # bounded: 48 decode steps after the prefills
                sched._apply_commands()
                if len(done) == n:
                    break
                sched.step()
            gaps[n] = [(b0 - a1) / 1e3 for (_, a1, na), (b0, _, nb) in zip(calls, calls[1:]) if na == nb == n]

    model.decode = timed_decode
    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        model.decode = decode
    row = {f"B={n}_gap_us_p50": round(float(np.median(g)), 1) for n, g in gaps.items()}
    row.update({f"B={n}_gap_us_p90": round(float(np.percentile(g, 90)), 1) for n, g in gaps.items()})
    REPORT["scheduler gap between decodes"] = row
    benchmark.extra_info.update(row)


def test_chat_prompt_encoding(benchmark, model):
    """A 20-message conversation re-sent with one new question each time, as a chat client does
    over Generate: encode_chat (pieces between special tokens cached) vs encoding the whole
    rendered prompt, alternating, both on conversations the tokenizer has not seen in full."""
    tok = model.tokenizer
    history = []
    for i in range(10):
        history += [{"role": "user", "content": f"Question {i}: tell me about topic {i} in detail. " * 3},
                    {"role": "assistant", "content": f"Answer {i}: a long answer on topic {i}, in full. " * 6}]
    turns = itertools.count()

    def conversation():
        return history + [{"role": "user", "content": f"And one more thing ({next(turns)})?"}]

    whole, pieces = [], []
    for _ in range(30):
        m = conversation()
        t0 = time.perf_counter()
        expected = tok.encode(tok.apply_chat_template(m))
        whole.append(time.perf_counter() - t0)
        m = conversation()
        t0 = time.perf_counter()
        tok.encode_chat(m)
        pieces.append(time.perf_counter() - t0)
    assert tok.encode_chat(m) == tok.encode(tok.apply_chat_template(m))
    benchmark.pedantic(lambda: tok.encode_chat(conversation()), rounds=30)
    row = {"prompt_tokens": len(expected), "whole_ms": round(float(np.median(whole)) * 1e3, 3),
           "cached_pieces_ms": round(float(np.median(pieces)) * 1e3, 3),
           "speedup": round(float(np.median(whole) / np.median(pieces)), 1)}
    REPORT["chat prompt encoding"] = row
    benchmark.extra_info.update(row)


def test_cold_and_warm_start(benchmark, model_path, tmp_path):
    """Cold: an empty Numba cache (everything compiles). Warm: the same cache, second process.
    One pedantic round, so it also runs under --benchmark-only and its numbers reach the JSON."""
    import json

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    script = START_SCRIPT.format(threads=THREADS)
    runs = {}

    def start_twice():
        for label in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", script, str(model_path)], env=env,
                                 capture_output=True, text=True, timeout=600, check=True)
            runs[label] = json.loads(out.stdout.strip().splitlines()[-1])

    benchmark.pedantic(start_twice, rounds=1, iterations=1)
    REPORT["start (load + JIT)"] = row = {
        "cold_jit_s": round(runs["cold"]["jit_s"], 1), "warm_jit_s": round(runs["warm"]["jit_s"], 2),
        "load_s": round(runs["warm"]["load_s"], 2)}
    benchmark.extra_info.update(row)


def test_peer_llama_cpp(benchmark, model, read_bandwidth_gbs):
    """llama.cpp on the same GGUF and thread count (pip install llama-cpp-python). The two run
    in alternating rounds in this process, so both see the same machine; the ratio is the median
    of the per-round ratios."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="peer bench needs `pip install llama-cpp-python`")
    llm = llama_cpp.Llama(model_path=str(model.path), n_threads=THREADS, n_threads_batch=THREADS,
                          n_ctx=1024, n_batch=PREFILL, verbose=False)
    prompt = np.random.default_rng(0).integers(100, 40000, PREFILL).astype(np.int32)
    blocks, table = _sequence(model, PREFILL)
    n = 64

    def ours_decode():
        model.prefill(prompt[:CONTEXT], table, 0)
        tok = np.array([42], np.int32)
        t = time.perf_counter()
        for i in range(n):
            model.decode(tok, np.array([CONTEXT + i], np.int32), table[None])
        return n / (time.perf_counter() - t)

    def peer_decode():
        llm.reset()
        llm.eval(prompt[:CONTEXT].tolist())
        t = time.perf_counter()
        for i in range(n):
            llm.eval([int(prompt[CONTEXT + i])])
        return n / (time.perf_counter() - t)

    def ours_prefill():
        t = time.perf_counter()
        model.prefill(prompt, table, 0)
        return PREFILL / (time.perf_counter() - t)

    def peer_prefill():
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt.tolist())
        return PREFILL / (time.perf_counter() - t)

    decode, prefill = [], []

    def alternate():
        ours_prefill(), peer_prefill(), ours_decode(), peer_decode()  # warm-up round, not counted
        decode.extend((ours_decode(), peer_decode()) for _ in range(6))
        prefill.extend((ours_prefill(), peer_prefill()) for _ in range(5))

    benchmark.pedantic(alternate, rounds=1, iterations=1)  # runs under --benchmark-only too
    model.kv.allocator.free(blocks)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    REPORT["llama.cpp (peer, alternating)"] = row = {
        "wafer_decode_tok/s": round(med([a for a, _ in decode]), 1),
        "llama.cpp_decode_tok/s": round(med([b for _, b in decode]), 1),
        "decode_ratio": round(med([a / b for a, b in decode]), 2),
        "wafer_prefill_tok/s": round(med([a for a, _ in prefill]), 1),
        "llama.cpp_prefill_tok/s": round(med([b for _, b in prefill]), 1),
        "prefill_ratio": round(med([a / b for a, b in prefill]), 2),
        "rounds": f"{len(decode)} decode, {len(prefill)} prefill, after a warm-up round",
    }
    benchmark.extra_info.update(row)
