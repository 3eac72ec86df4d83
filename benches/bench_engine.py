"""Engine throughput on the real model, in both numeric modes (exact, fast): decode (1 stream),
prefill (512 tokens), batched decode (B=16), each with bytes of weights read per token and
achieved GB/s next to the read bandwidth measured in the same run; cold/warm JIT start;
llama.cpp on the same file (benches/peer_llama.py: its own venv, WAFER_PEER_PYTHON) in
alternating rounds with both modes, with long-context prefill (4k, 8k; WAFER_BENCH_LONG=0 skips);
logit accuracy of both modes and of llama.cpp against the float64 reference; the scheduler's own time between two decode calls (the part of
the serving bench's per-token overhead that is engine bookkeeping, not serving); and encoding a
re-sent chat conversation (cached pieces vs encoding the whole rendered prompt)."""

from __future__ import annotations

import itertools
import json
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


MODES = ("exact", "fast")
_models: dict[str, Model] = {}


@pytest.fixture(scope="module")
def models(model_path):
    def get(numerics):
        if numerics not in _models:
            m = _models[numerics] = Model(model_path, max_batch=BATCH, threads=THREADS, numerics=numerics)
            m.warmup()
        return _models[numerics]

    yield get
    _models.clear()


@pytest.fixture(scope="module")
def model(models):
    return models("exact")


def _sequence(model, n_tokens):
    blocks = model.kv.allocator.allocate(model.kv.blocks_for(n_tokens))
    return blocks, np.array(blocks, np.int32)


@pytest.fixture(scope="module")
def weights_bandwidth_gbs(model):
    """The same parallel read over a buffer the size of the weights: the rate those bytes can be
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


@pytest.mark.parametrize("numerics", MODES)
def test_decode_one_stream(benchmark, models, numerics, read_bandwidth_gbs, weights_bandwidth_gbs):
    model = models(numerics)
    blocks, table = _sequence(model, CONTEXT + 1)
    prompt = np.arange(1, CONTEXT + 1, dtype=np.int32)
    model.prefill(prompt, table, 0)
    tok, pos, tables = np.array([42], np.int32), np.array([CONTEXT], np.int32), table[None]
    benchmark.pedantic(model.decode, args=(tok, pos, tables), rounds=60, warmup_rounds=5)
    model.kv.allocator.free(blocks)
    tok_s = 1.0 / benchmark.stats.stats.median
    REPORT[f"decode B=1 {numerics}"] = row = _row(model, tok_s, read_bandwidth_gbs,
                                      weights_bandwidth=weights_bandwidth_gbs)
    benchmark.extra_info.update(row)


@pytest.mark.parametrize("numerics", MODES)
def test_prefill_512(benchmark, models, numerics, read_bandwidth_gbs):
    model = models(numerics)
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
    REPORT[f"prefill 512 {numerics}"] = row
    benchmark.extra_info.update(row)


@pytest.mark.parametrize("numerics", MODES)
def test_batched_decode_16(benchmark, models, numerics, read_bandwidth_gbs):
    model = models(numerics)
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
    if f"prefill 512 {numerics}" in REPORT:
        row["vs_prefill"] = round(tok_s / REPORT[f"prefill 512 {numerics}"]["tok/s"], 2)
    REPORT[f"decode B={BATCH} (aggregate) {numerics}"] = row
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


def _peer_python() -> str | None:
    """WAFER_PEER_PYTHON, else this python when it has llama_cpp (see benches/peer_llama.py)."""
    named = os.environ.get("WAFER_PEER_PYTHON")
    if named:
        return named
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return sys.executable


class Peer:
    """benches/peer_llama.py in a subprocess: one JSON request, one JSON answer."""

    def __init__(self, python, model_path, n_ctx):
        self.proc = subprocess.Popen([python, "-m", "benches.peer_llama", str(model_path), str(THREADS), str(n_ctx)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def __call__(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ans = json.loads(self.proc.stdout.readline())
        if "error" in ans:
            raise RuntimeError(ans["error"])
        return ans

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def peer(model_path):
    python = _peer_python()
    if python is None:
        pytest.skip("no llama.cpp peer: set WAFER_PEER_PYTHON (benches/peer_llama.py says how to build it)")
    p = Peer(python, model_path, n_ctx=LONG[-1] + 64)
    yield p
    p.close()


LONG = (4096, 8192)  # long-context prefill lengths (the model's context is 8192)


def test_peer_llama_cpp(benchmark, models, peer, read_bandwidth_gbs, weights_bandwidth_gbs):
    """llama.cpp (AVX-512 build, its own process) on the same GGUF and thread count, in
    alternating rounds with both of our modes, so all see the same machine; ratios are the
    medians of the per-round ratios. Decode at context 64, prefill of 512 tokens, and (one
    round each) prefill of 4k and 8k tokens."""
    prompt = np.random.default_rng(0).integers(100, 40000, LONG[-1]).astype(np.int32)
    n = 64
    ours = {m: models(m) for m in MODES}
    tables = {m: _sequence(mod, LONG[-1])[1] for m, mod in ours.items()}

    def ours_decode(m):
        model, table = ours[m], tables[m]
        model.prefill(prompt[:CONTEXT], table, 0)
        tok = np.array([42], np.int32)
        t = time.perf_counter()
        for i in range(n):
            model.decode(tok, np.array([CONTEXT + i], np.int32), table[None])
        return n / (time.perf_counter() - t)

    def ours_prefill(m, length=PREFILL):
        t = time.perf_counter()
        ours[m].prefill(prompt[:length], tables[m], 0)
        return length / (time.perf_counter() - t)

    def peer_decode():
        return peer(op="decode", prompt=prompt[:CONTEXT].tolist(), n=n)["tok_s"]

    def peer_prefill(length=PREFILL):
        return peer(op="prefill", prompt=prompt[:length].tolist())["tok_s"]

    rounds = {"decode": [], "prefill": []}
    long = {}

    def alternate():
        for m in MODES:  # warm-up round, not counted
            ours_prefill(m), ours_decode(m)
        peer_prefill(), peer_decode()
        for _ in range(6):
            rounds["decode"].append({**{m: ours_decode(m) for m in MODES}, "llama.cpp": peer_decode()})
        for _ in range(4):
            rounds["prefill"].append({**{m: ours_prefill(m) for m in MODES}, "llama.cpp": peer_prefill()})
        if os.environ.get("WAFER_BENCH_LONG", "1") != "0":
            for length in LONG:
                long[length] = {**{m: ours_prefill(m, length) for m in MODES}, "llama.cpp": peer_prefill(length)}

    benchmark.pedantic(alternate, rounds=1, iterations=1)  # runs under --benchmark-only too
    med = lambda xs: float(np.median(xs))  # noqa: E731
    per_token = ours["exact"].weight_bytes_per_token()
    row = {"llama.cpp": peer(op="info")["version"]}
    for kind, rs in rounds.items():
        row[f"llama.cpp_{kind}_tok/s"] = round(med([r["llama.cpp"] for r in rs]), 1)
        for m in MODES:
            row[f"{m}_{kind}_tok/s"] = round(med([r[m] for r in rs]), 1)
            row[f"{m}_{kind}_ratio"] = round(med([r[m] / r["llama.cpp"] for r in rs]), 2)
    for who in MODES + ("llama.cpp",):  # decode streams the weights once per token
        gbs = row[f"{who}_decode_tok/s"] * per_token / 1e9
        row[f"{who}_decode_of_weights_sized_read"] = round(gbs / weights_bandwidth_gbs, 3)
        row[f"{who}_decode_of_read_bw"] = round(gbs / read_bandwidth_gbs, 3)
    for length, r in long.items():
        for who, v in r.items():
            row[f"prefill{length}_{who}_tok/s"] = round(v, 1)
        for m in MODES:
            row[f"prefill{length}_{m}_ratio"] = round(r[m] / r["llama.cpp"], 2)
    row["rounds"] = f"{len(rounds['decode'])} decode, {len(rounds['prefill'])} prefill, 1 per long prefill"
    REPORT["llama.cpp (peer, alternating)"] = row
    benchmark.extra_info.update(row)


ACCURACY_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
    "Within fifty years presses were running in more than two hundred European cities, and the "
    "price of books fell so far that reading spread well beyond monasteries and universities. "
    "Scholars argue about how much the press caused the Reformation and the scientific revolution, "
    "but few doubt that cheap pamphlets changed how quickly ideas could travel. Question: which "
    "city is usually named as the place where Gutenberg built his first press? Answer: Mainz, a "
    "city on the Rhine, where he worked in the 1440s and 1450s before printing his famous Bible, "
    "of which about forty-nine copies survive today in libraries around the world.")
ACCURACY_CODE = (  # code, as a coding assistant reads it
    "import json\nfrom pathlib import Path\n\n\nclass Inventory:\n    \"\"\"Items by name, with "
    "their count and unit price.\"\"\"\n\n    def __init__(self, path):\n        self.path = Path(path)\n"
    "        self.items = json.loads(self.path.read_text()) if self.path.exists() else {}\n\n"
    "    def add(self, name, count, price):\n        item = self.items.setdefault(name, {\"count\": 0, "
    "\"price\": price})\n        item[\"count\"] += count\n        item[\"price\"] = price\n\n"
    "    def total_value(self):\n        return sum(i[\"count\"] * i[\"price\"] for i in "
    "self.items.values())\n\n    def save(self):\n        self.path.write_text(json.dumps(self.items, "
    "indent=2))\n\n\ndef cheapest(inventory, n=3):\n    ranked = sorted(inventory.items.items(), "
    "key=lambda kv: kv[1][\"price\"])\n    return [name for name, _ in ranked[:n]]\n")
ACCURACY_CHAT = (  # a dialogue, through plain text
    "User: My bike chain keeps slipping when I climb hills. What should I check first?\n"
    "Assistant: Start with the chain itself: measure its stretch with a chain checker, because a "
    "worn chain no longer sits deep in the cassette teeth. If it is past 0.75 percent, replace it, "
    "and expect to replace the cassette too if the teeth look like shark fins. Then check the "
    "derailleur hanger for a bend and the cable tension with the barrel adjuster.\n"
    "User: The chain is new. Could it be the cassette?\nAssistant: Yes. A new chain on a worn "
    "cassette skips under load, exactly when you climb.")
ACCURACY_TEXTS = (ACCURACY_TEXT, ACCURACY_CODE, ACCURACY_CHAT)


def test_accuracy_vs_reference(benchmark, models, model_path, tmp_path):
    """Teacher-forced logits of held-out texts (prose, code, a dialogue) against the float64
    numpy reference (tests/reference.py: HF-style math on the same quantized weights): the
    error on the reference's top-5 logits of each position (largest, mean, 99th percentile)
    and how often the argmax agrees; for exact, fast and (when the peer is there) llama.cpp."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from reference import reference_logits

    texts = [models("exact").tokenizer.encode(t) for t in ACCURACY_TEXTS]
    errs, agree = {}, {}

    def run():
        python = _peer_python()
        for i, tokens in enumerate(texts):
            want = reference_logits(model_path, tokens)
            got = {m: models(m).logits(tokens) for m in MODES}
            if python:
                p = Peer(python, model_path, n_ctx=len(tokens) + 16)
                p(op="logits", tokens=tokens, out=str(tmp_path / f"peer{i}.npy"))
                p.close()
                got["llama.cpp"] = np.load(tmp_path / f"peer{i}.npy")
            top5 = np.argsort(-want, axis=1)[:, :5]
            for who, logits in got.items():
                err = np.abs(np.take_along_axis(logits, top5, 1) - np.take_along_axis(want, top5, 1))
                errs.setdefault(who, []).append(err.ravel())
                agree[who] = agree.get(who, 0) + int((logits.argmax(1) == want.argmax(1)).sum())

    benchmark.pedantic(run, rounds=1, iterations=1)
    n = sum(len(t) for t in texts)
    row = {"texts": len(texts), "tokens": n}
    for who, e in errs.items():
        e = np.concatenate(e)
        row[f"{who}_top5_max_abs_err"] = round(float(e.max()), 5)
        row[f"{who}_top5_mean_abs_err"] = round(float(e.mean()), 5)
        row[f"{who}_top5_p99_abs_err"] = round(float(np.quantile(e, 0.99)), 5)
        row[f"{who}_argmax_agree"] = f"{agree[who]}/{n}"
    REPORT["accuracy vs float64 reference"] = row
    benchmark.extra_info.update(row)
