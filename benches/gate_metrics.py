"""What `wafer bench gate` measures.

Deterministic metrics are the same on every run of the same tree on the same kind of machine:
the simulator's cycles and tokens/s for the presets, the weights a decode step reads, the tokens
and text of seeded runs of the real model, and how the scheduler splits a fixed workload into
steps. A change in one of them is a change in behaviour, never noise.

Wall-clock metrics are ratios: a time of ours divided by a reference timed in the same round on
the same machine (the read bandwidth, a BLAS matrix product), so that a machine that is busy or
slow today moves both sides. Each round times reference and subject back to back.
"""

from __future__ import annotations

import time

import numpy as np

SIM_CASES = (  # (model preset, hardware preset, prompt, output, sequences in flight)
    ("llama-3.1-8b", "wse3", 1024, 128, 1),
    ("llama-3.1-70b", "wse3", 1024, 128, 1),
    ("llama-3.1-70b", "wse3", 1024, 128, 16),
    ("llama-3.1-405b", "wse3", 2048, 256, 1),
    ("llama-3.1-8b", "wse2", 1024, 128, 1),
)
SEEDED_PROMPTS = ("What is the capital of France?",
                  "Write a Python function that reverses a string.")
SEEDED_TOKENS = 24
CODE_EDIT_PROMPT = ("Rename the variable `total` to `running_sum` in this function and change nothing else:\n"
                    "def add_all(values):\n    total = 0\n    for v in values:\n        total += v\n"
                    "    return total\n")
WORKLOAD_REQUESTS = 12  # the scheduler workload: varied prompts and lengths, submitted at once


def sim_metrics() -> dict[str, float]:
    """Cycles and tokens/s of `wafer sim run` for each case (integers and exact floats)."""
    from sim.hardware import get_hardware
    from sim.placement import plan
    from sim.shapes import get_shape
    from sim.timing import TimingModel, summarize

    out = {}
    for model, hw, prompt, output, seqs in SIM_CASES:
        shape = get_shape(model)
        p = plan(shape, get_hardware(hw), min(8192, shape.context_length), seqs)
        s = summarize(TimingModel(p), prompt, output, seqs)
        key = f"sim/{model}@{hw} p{prompt} o{output} x{seqs}"
        out[f"{key}/token_latency_cycles"] = s["token_latency_cycles"]
        out[f"{key}/ttft_cycles"] = s["ttft_cycles"]
        out[f"{key}/wafers"] = s["wafers"]
        out[f"{key}/pipeline_tokens_per_s"] = s["pipeline_tokens_per_s"]
    return out


def model_metrics(model) -> dict[str, float]:
    """What one decode step must read and compute, from the loaded model."""
    return {"model/weight_bytes_per_token": model.weight_bytes_per_token(),
            "model/macs_per_token": model.macs_per_token()}


def seeded_runs(model) -> dict[str, object]:
    """Token ids and text of greedy and seeded-sampling runs: any change in the numbers the
    kernels produce, the sampler or the stop rules shows here."""
    from engine.generate import Generation, prompt_ids
    from engine.sampling import SamplingParams

    out: dict[str, object] = {}
    settings = {"greedy": SamplingParams(temperature=0, max_tokens=SEEDED_TOKENS),
                "sampled": SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=SEEDED_TOKENS)}
    for i, prompt in enumerate(SEEDED_PROMPTS):
        for name, params in settings.items():
            toks = list(Generation(model, prompt_ids(model, prompt), params))
            out[f"seeded/{i}/{name}/token_ids"] = [t.id for t in toks]
            out[f"seeded/{i}/{name}/text"] = "".join(t.text for t in toks)
    return out


def fast_and_speculative_runs(model_path: str, exact_model) -> dict[str, object]:
    """Greedy tokens in fast numerics (int8 activations), and a code edit with prompt-lookup
    speculation: its tokens (equal to plain greedy decoding) and its draft/accept counts."""
    from engine.generate import Generation, prompt_ids
    from engine.model import Model
    from engine.sampling import SamplingParams

    fast = Model(model_path, max_batch=1, threads=2, numerics="fast")
    out: dict[str, object] = {}
    ids = prompt_ids(fast, SEEDED_PROMPTS[1])
    out["fast/greedy/token_ids"] = [t.id for t in Generation(fast, ids, SamplingParams(temperature=0, max_tokens=SEEDED_TOKENS))]
    ids = prompt_ids(exact_model, CODE_EDIT_PROMPT)
    gen = Generation(exact_model, ids, SamplingParams(temperature=0, max_tokens=48, num_speculative_tokens=4))
    out["speculative/code_edit/token_ids"] = [t.id for t in gen]
    out["speculative/code_edit/steps"] = gen.stats.spec_steps
    out["speculative/code_edit/draft_tokens"] = gen.stats.spec_draft_tokens
    out["speculative/code_edit/accepted_tokens"] = gen.stats.spec_accepted_tokens
    return out


def scheduler_workload(model) -> dict[str, float]:
    """A fixed burst of requests through the continuous-batching scheduler: how many model calls
    it makes and how many tokens each carries. Steps and tokens per step are the scheduler's
    policy (chunking, admission, batching), not timing: all requests are queued before it starts."""
    from engine.sampling import SamplingParams
    from engine.scheduler import FinishEvent, Request, Scheduler, SchedulerConfig

    calls: list[tuple[str, int]] = []
    decode, prefill = model.decode, model.prefill

    def counted_decode(tokens, *a, **k):
        calls.append(("decode", len(tokens)))
        return decode(tokens, *a, **k)

    def counted_prefill(tokens, *a, **k):
        calls.append(("prefill", len(tokens)))
        return prefill(tokens, *a, **k)

    finished = []
    sched = Scheduler(model, SchedulerConfig(max_batch=8, prefill_chunk=64, prefill_budget_idle=512),
                      publish=lambda items, quiet: finished.extend(
                          ev for _, ev in items if isinstance(ev, FinishEvent)))
    words = "the quick brown fox jumps over a lazy dog while wafers stream tokens".split()
    for i in range(WORKLOAD_REQUESTS):
        text = " ".join(words[(i + j) % len(words)] for j in range(8 + 29 * i))
        sched.submit(Request(model.tokenizer.encode(text), request_id=f"w{i}",
                             params=SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True)))
    model.decode, model.prefill = counted_decode, counted_prefill
    try:
        sched.start()
        deadline = time.monotonic() + 300  # bounded: the workload takes a few seconds
        while len(finished) < WORKLOAD_REQUESTS and time.monotonic() < deadline:
            time.sleep(0.01)
        sched.stop()
    finally:
        model.decode, model.prefill = decode, prefill
    if len(finished) < WORKLOAD_REQUESTS:
        raise RuntimeError(f"scheduler workload: {len(finished)} of {WORKLOAD_REQUESTS} requests finished in 300 s")
    dec = [n for kind, n in calls if kind == "decode"]
    pre = [n for kind, n in calls if kind == "prefill"]
    return {"scheduler/decode_steps": len(dec), "scheduler/prefill_calls": len(pre),
            "scheduler/decode_tokens": sum(dec), "scheduler/prefill_tokens": sum(pre),
            "scheduler/tokens_per_decode_step": round(sum(dec) / max(len(dec), 1), 6),
            "scheduler/max_decode_batch": max(dec, default=0)}


def deterministic(model_path: str | None) -> dict[str, object]:
    """Every deterministic metric; the model-backed ones only when a model path is given."""
    out: dict[str, object] = dict(sim_metrics())
    if model_path:
        from engine.model import Model

        model = Model(model_path, max_batch=8, threads=2)
        out.update(model_metrics(model))
        out.update(seeded_runs(model))
        out.update(fast_and_speculative_runs(model_path, model))
        out.update(scheduler_workload(model))
    return out


# ---------------------------------------------------------------------------- wall clock


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class WallClock:
    """One model, timed against two references in interleaved rounds.

    decode_of_read_bw: the weights a B=1 decode step reads, per second, over the machine's read
      bandwidth (a two-thread numpy read of 4x the last-level cache), both timed in the same round.
    prefill_of_blas: prefill-512 MACs per second over a float32 BLAS matrix product's.
    """

    CONTEXT = 64
    PREFILL = 512

    def __init__(self, model_path: str):
        from benches.conftest import ReadPass, l3_cache_bytes
        from engine.model import Model

        self.model = m = Model(model_path, max_batch=1, threads=2)
        m.warmup()
        self.read = ReadPass(max(1 << 29, 4 * l3_cache_bytes()), threads=2)
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((1024, 1024), dtype=np.float32)
        self.b = rng.standard_normal((1024, 1024), dtype=np.float32)
        n = self.PREFILL
        self.blocks = m.kv.allocator.allocate(m.kv.blocks_for(n + 1))
        self.table = np.array(self.blocks, np.int32)
        self.prompt = rng.integers(0, m.config.vocab_size, n).astype(np.int32)

    def close(self) -> None:
        self.model.kv.allocator.free(self.blocks)
        self.read.close()

    def round(self, passes: int = 3) -> dict[str, float]:
        """Each reference and subject timed in turn, `passes` times over, best of each: the
        two sides of a ratio are never more than a second apart."""
        m = self.model
        tok, pos = np.array([42], np.int32), np.array([self.CONTEXT], np.int32)
        best = dict.fromkeys(("read", "decode", "blas", "prefill"), float("inf"))
        for _ in range(passes):
            best["read"] = min(best["read"], self.read.seconds())
            m.prefill(self.prompt[: self.CONTEXT], self.table, 0)
            best["decode"] = min(best["decode"], _best(lambda: m.decode(tok, pos, self.table[None]), 10))
            best["blas"] = min(best["blas"], _best(lambda: self.a @ self.b, 2))
            best["prefill"] = min(best["prefill"], _best(lambda: m.prefill(self.prompt, self.table, 0), 1))
        read_gbs = self.read.a.nbytes / best["read"] / 1e9
        decode_gbs = m.weight_bytes_per_token() / best["decode"] / 1e9
        blas_macs = 1024 ** 3 / best["blas"]
        prefill_macs = self.PREFILL * m.macs_per_token(with_head=False) / best["prefill"]
        return {"decode_of_read_bw": decode_gbs / read_gbs, "prefill_of_blas": prefill_macs / blas_macs}


RATIO_DIRECTIONS = {"decode_of_read_bw": "higher", "prefill_of_blas": "higher"}
