"""Speculative decoding by prompt lookup on the real model: a code-editing workload (prompts that
hold code and ask for a rename, a fix, a rewrite) and a free-writing one. Single stream with and
without speculation (greedy, alternating in rounds, so both see the same machine), acceptance
rate and mean accepted length; then 16 streams at once through the scheduler, aggregate tok/s;
and a verify step's cost by its rows, next to the table the adaptive choice of k uses
(engine.scheduler.speculate.STEP_COST[numerics]; `--step-cost` measures only that).
Reports; asserts nothing about time (the outputs must be equal: greedy output is unchanged).

    .venv/bin/python -m pytest benches/bench_speculation.py -s     # or
    .venv/bin/python -m benches.bench_speculation [--rounds 2] [--max-tokens 128] [-k 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from engine.generate import Generation
from engine.model import Model
from engine.sampling import SamplingParams
from engine.scheduler import FinishEvent, Request, Scheduler, SchedulerConfig, TokenEvent, iter_events
from engine.scheduler.speculate import STEP_COST

THREADS = int(os.environ.get("WAFER_THREADS", "2"))
K = 5
STREAMS = 16

_CODE_1 = '''def compute_total(items):
    total = 0
    for item in items:
        if item.price > 0:
            total += item.price * item.quantity
    return total


def apply_discount(total, percent):
    return total - total * percent / 100
'''

_CODE_2 = '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

    def peek(self):
        return self.items[len(self.items)]

    def is_empty(self):
        return len(self.items) == 0
'''

_CODE_3 = '''import json

def load_config(path):
    f = open(path)
    data = json.load(f)
    return data

def save_config(path, data):
    f = open(path, "w")
    json.dump(data, f)
'''

_CODE_4 = '''function fetchUser(id) {
  return fetch("/api/users/" + id)
    .then(function (response) { return response.json(); })
    .then(function (user) { console.log(user.name); return user; });
}
'''

# (instruction, code): the answer starts with the code fence (the assistant's reply is primed)
CODE_EDITS = [
    ("Rename the function compute_total to order_total. Keep everything else the same.", _CODE_1),
    ("Fix the bug in peek: it should return the last item. Show the whole class.", _CODE_2),
    ("Rewrite these functions to use `with open(...)` so the files are closed.", _CODE_3),
    ("Rename the parameter id to userId everywhere in this function.", _CODE_4),
]

FREE_WRITING = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your summer holidays.",
]


def code_prompt(model: Model, instruction: str, code: str) -> list[int]:
    tok = model.tokenizer
    lang = "javascript" if "function " in code else "python"
    ids = tok.encode_chat([{"role": "user", "content": f"{instruction}\n\n```{lang}\n{code}```"}])
    return ids + tok.encode(f"```{lang}\n")


def free_prompt(model: Model, text: str) -> list[int]:
    return model.tokenizer.encode_chat([{"role": "user", "content": text}])


def single_stream(model: Model, prompt: list[int], k: int, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, num_speculative_tokens=k)
    g = Generation(model, prompt, params)
    t0 = time.perf_counter()
    ids = [t.id for t in g]
    wall = time.perf_counter() - t0
    s = g.stats
    return {"ids": ids, "tok_s": len(ids) / max(wall - s.ttft_s, 1e-9) if len(ids) > 1 else 0.0,
            "decode_s": wall - s.ttft_s, "n": len(ids), "steps": s.spec_steps,
            "drafts": s.spec_draft_tokens, "accepted": s.spec_accepted_tokens}


def compare(model: Model, prompts: list[list[int]], k: int, max_tokens: int, rounds: int) -> dict:
    """Each prompt with and without speculation, alternating, ``rounds`` times: total decode
    time per mode (medians over rounds), acceptance, and whether the outputs were equal."""
    times = {0: [], k: []}
    toks = {0: 0, k: 0}
    steps = drafts = accepted = 0
    equal = True
    for r in range(rounds):
        per = {0: 0.0, k: 0.0}
        for i, p in enumerate(prompts):
            order = (0, k) if (r + i) % 2 == 0 else (k, 0)
            out = {}
            for kk in order:
                res = single_stream(model, p, kk, max_tokens)
                out[kk] = res["ids"]
                per[kk] += res["decode_s"]
                if r == 0:
                    toks[kk] += res["n"] - 1
                if kk and r == 0:
                    steps += res["steps"]
                    drafts += res["drafts"]
                    accepted += res["accepted"]
            equal &= out[0] == out[k]
        for kk in per:
            times[kk].append(per[kk])
    t0, tk = statistics.median(times[0]), statistics.median(times[k])
    return {"tok_s_plain": toks[0] / t0, "tok_s_spec": toks[k] / tk, "speedup": t0 / tk,
            "acceptance_rate": accepted / drafts if drafts else 0.0,
            "mean_accepted_length": 1 + accepted / steps if steps else 0.0,
            "spec_steps": steps, "draft_tokens": drafts, "accepted_tokens": accepted,
            "greedy_equal": equal, "tokens": toks[0]}


def streams(model: Model, prompts: list[list[int]], k: int, max_tokens: int) -> dict:
    """len(prompts) streams submitted at once; aggregate tok/s from the first token to the last."""
    events = []
    sched = Scheduler(model, SchedulerConfig(max_batch=len(prompts)),
                      publish=lambda items, quiet: events.extend(iter_events(items)))
    reqs = [Request(p, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                      num_speculative_tokens=k)) for p in prompts]
    for r in reqs:
        sched.submit(r)
    t0 = time.perf_counter()
    first = None
    n = 0
    while True:
        sched.apply_commands()
        if sched.idle():
            break
        sched.step()
        if first is None and any(isinstance(e, TokenEvent) for _, e in events):
            first = time.perf_counter()
    wall = time.perf_counter() - (first or t0)
    fins = [e for _, e in events if isinstance(e, FinishEvent)]
    n = sum(1 for _, e in events if isinstance(e, TokenEvent))
    drafts = sum(f.stats.spec_draft_tokens for f in fins)
    acc = sum(f.stats.spec_accepted_tokens for f in fins)
    steps = sum(f.stats.spec_steps for f in fins)
    return {"tok_s": n / wall, "tokens": n, "wall_s": wall,
            "acceptance_rate": acc / drafts if drafts else 0.0,
            "mean_accepted_length": 1 + acc / steps if steps else 0.0}


def step_costs(model: Model, context: int = 300, reps: int = 25) -> list[float]:
    """A decode step's time by its rows (1 .. 5: one sequence's last token and its
    drafts, at ``context`` tokens of history), relative to one row; the minimum of ``reps``
    interleaved rounds, so every row count sees the same machine."""
    kv = model.kv
    top = len(STEP_COST[model.numerics])
    blocks = kv.allocator.allocate(kv.blocks_for(context + top))
    try:
        table = np.array(blocks, dtype=np.int32).reshape(1, -1)
        model.prefill(np.arange(1, context + 1, dtype=np.int32) % 1000, table[0], 0)
        tok = np.arange(7, 7 + top, dtype=np.int32)
        pos = np.arange(context, context + top, dtype=np.int32)
        seq = np.zeros(top, np.int32)
        best = [float("inf")] * top
        for _ in range(reps):
            for n in range(1, top + 1):
                t0 = time.perf_counter()
                model.decode_rows(tok[:n], pos[:n], seq[:n], table)
                best[n - 1] = min(best[n - 1], time.perf_counter() - t0)
    finally:
        kv.allocator.free(blocks)
    return [b / best[0] for b in best] + [best[0] * 1e3]


def run_all(model: Model, k: int = K, max_tokens: int = 128, rounds: int = 2) -> dict:
    code = [code_prompt(model, i, c) for i, c in CODE_EDITS]
    free = [free_prompt(model, t) for t in FREE_WRITING]
    out = {"k": k, "max_tokens": max_tokens, "rounds": rounds, "numerics": model.numerics}
    *rel, one_ms = step_costs(model)
    out["step_cost"] = {"measured": rel, "table": list(STEP_COST[model.numerics]), "one_row_ms": one_ms}
    out["code_edit"] = compare(model, code, k, max_tokens, rounds)
    out["free_writing"] = compare(model, free, k, max_tokens, rounds)
    many = [code[i % len(code)] for i in range(STREAMS)]
    s0 = streams(model, many, 0, max_tokens)
    sk = streams(model, many, k, max_tokens)
    s0b = streams(model, many, 0, max_tokens)  # plain again: the machine's drift between runs
    plain = (s0["tok_s"] + s0b["tok_s"]) / 2
    out["streams_16_code_edit"] = {"tok_s_plain": plain, "tok_s_spec": sk["tok_s"],
                                   "speedup": sk["tok_s"] / plain,
                                   "acceptance_rate": sk["acceptance_rate"],
                                   "mean_accepted_length": sk["mean_accepted_length"]}
    return out


def print_step_cost(c: dict) -> None:
    print(f"  verify step cost by rows 1-{len(c['table'])} (one row {c['one_row_ms']:.2f} ms): measured "
          f"{', '.join(f'{v:.2f}' for v in c['measured'])}; STEP_COST {', '.join(map(str, c['table']))}")


def print_report(r: dict) -> None:
    print(f"\nspeculation by prompt lookup, k={r['k']}, greedy, {r['max_tokens']} tokens, "
          f"{r['rounds']} alternating rounds, numerics={r['numerics']}")
    print_step_cost(r["step_cost"])
    for name in ("code_edit", "free_writing"):
        c = r[name]
        print(f"  {name:<13} single stream: {c['tok_s_plain']:6.1f} -> {c['tok_s_spec']:6.1f} tok/s "
              f"({c['speedup']:.2f}x); acceptance {c['acceptance_rate']:.2f}, mean accepted length "
              f"{c['mean_accepted_length']:.2f} ({c['spec_steps']} verify steps); greedy equal: "
              f"{c['greedy_equal']}")
    s = r["streams_16_code_edit"]
    print(f"  16 streams (code edits): {s['tok_s_plain']:6.1f} -> {s['tok_s_spec']:6.1f} tok/s aggregate "
          f"({s['speedup']:.2f}x); acceptance {s['acceptance_rate']:.2f}, mean accepted length "
          f"{s['mean_accepted_length']:.2f}")


def test_speculation(benchmark, model_path):
    from benches.conftest import REPORT

    model = Model(model_path, max_batch=STREAMS, threads=THREADS)
    model.warmup()
    result = {}
    benchmark.pedantic(lambda: result.update(run_all(model)), rounds=1, iterations=1)
    print_report(result)
    benchmark.extra_info.update({k: v for k, v in result.items()})
    REPORT["speculation"] = result
    assert result["code_edit"]["greedy_equal"] and result["free_writing"]["greedy_equal"]


def main() -> None:
    from engine.fetch import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", type=int, default=K)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--numerics", default="exact")
    ap.add_argument("--step-cost", action="store_true", help="only measure the verify step's cost by rows")
    args = ap.parse_args()
    model = Model(resolve_model("smollm2-135m"), max_batch=STREAMS, threads=THREADS,
                  numerics=args.numerics)
    model.warmup()
    if args.step_cost:
        *rel, one_ms = step_costs(model)
        print_step_cost({"measured": rel, "table": list(STEP_COST[model.numerics]), "one_row_ms": one_ms})
        return
    print_report(run_all(model, args.k, args.max_tokens, args.rounds))


if __name__ == "__main__":
    main()
