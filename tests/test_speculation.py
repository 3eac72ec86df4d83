"""Speculative decoding by prompt lookup: the n-gram proposer, greedy output unchanged token for
token (tiny synthetic model and the real one; alone and in batches mixing speculating and plain
sequences), the rejection rule's distribution, stops never passed, validation, usage and
metrics."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from engine.generate import Generation
from engine.model import Model
from engine.sampling import SamplingParams, StreamPolicy
from engine.scheduler import Request
from engine.scheduler.speculate import STEP_COST, Speculator, expected_tokens, propose
from scheduler_harness import make, outputs, run


def drafts_of(tokens, k=4, lo=2, hi=5):
    out = np.zeros(k, np.int32)
    arr = np.array(tokens, np.int32)
    m = propose(arr, arr.size, lo, hi, k, out)
    return out[:m].tolist()


# ------------------------------------------------------------------------------- proposer


def test_proposer_continues_the_longest_most_recent_match():
    # suffix [7, 8, 9] occurred once; the 2-gram [8, 9] also later: the longer match wins
    assert drafts_of([1, 7, 8, 9, 4, 5, 6, 2, 8, 9, 3, 3, 7, 8, 9]) == [4, 5, 6, 2]
    # among equal lengths, the most recent occurrence
    assert drafts_of([5, 6, 1, 2, 5, 6, 3, 4, 5, 6], k=2) == [3, 4]
    # fewer than min_n matching tokens: nothing
    assert drafts_of([1, 2, 3, 4, 9, 5, 6, 7, 4], lo=2) == []
    assert drafts_of([1, 2, 3, 4, 9, 5, 6, 7, 4], lo=1, k=2) == [9, 5]
    # a repeating run proposes its next periods (the match overlaps the suffix)
    assert drafts_of([9, 1, 2, 1, 2, 1, 2], k=5) == [1, 2, 1, 2, 1]
    assert drafts_of([3, 3, 3], k=3) == [3, 3, 3]
    # too short to hold a match
    assert drafts_of([4, 4], lo=2) == []


def test_adaptive_speculation_backs_off_when_drafts_fail_and_probes_again():
    sp = Speculator(4, 2, 5)
    assert sp.plan() >= 2  # optimistic before any step
    for _ in range(6):
        sp.record(4, 0)
    plans = []
    for _ in range(60):  # drafts keep failing
        plans.append(sp.plan())
        if plans[-1]:
            sp.record(plans[-1], 0)
    cost = STEP_COST["exact"]
    cheapest = max(range(1, 5), key=lambda k: k / cost[k])  # drafts per step time, one row + k
    assert plans.count(0) >= 50          # mostly paused, the pauses growing
    assert cheapest in plans[20:]        # but probes with the cheapest drafts now and then
    later = []
    for _ in range(80):  # now the drafts are accepted: after the next probe it keeps speculating
        later.append(sp.plan())
        if later[-1]:
            sp.record(later[-1], later[-1])
    best = max(range(1, 5), key=lambda k: (k + 1) / cost[k])  # all accepted: k + 1 tokens a step
    assert later[-10:] == [best] * 10
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4


# ------------------------------------------------------------------------------- greedy equality


@pytest.fixture(scope="module")
def path(tiny_gguf):
    return tiny_gguf("Q4_1", context_length=1024)


def _run(path, prompts_params):
    sched, events = make(path)
    reqs = [Request(p, sp) for p, sp in prompts_params]
    for r in reqs:
        sched.submit(r)
    run(sched)
    assert sched.allocator.num_used == 0
    return outputs(events, reqs)


PROMPTS = [list(range(3, 40)) * 3, [5, 6, 7, 8, 9] * 3, list(range(100, 160)), [11, 12, 13, 11, 12]]


def _params(k, n=60, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, num_speculative_tokens=k,
                          **kw)


def test_greedy_output_is_unchanged_by_speculation_in_a_mixed_batch(path):
    plain, plain_fin = _run(path, [(p, _params(0)) for p in PROMPTS])
    # every other sequence speculates, with different k and lookup lengths
    mixed = [(p, _params(4 if i % 2 == 0 else 0)) for i, p in enumerate(PROMPTS)]
    mixed[3] = (PROMPTS[3], _params(7, prompt_lookup_min=1, prompt_lookup_max=3))
    spec, spec_fin = _run(path, mixed)
    assert spec == plain
    assert [f.reason for f in spec_fin] == [f.reason for f in plain_fin]
    st = spec_fin[0].stats
    assert st.spec_steps > 0 and 0 < st.spec_accepted_tokens <= st.spec_draft_tokens
    assert sum(st.spec_accepted_per_pos) == st.spec_accepted_tokens
    assert spec_fin[1].stats.spec_steps == 0  # not asked to speculate
    assert st.completion_tokens == 60


def test_speculation_never_emits_past_a_stop(path):
    plain, _ = _run(path, [(PROMPTS[0], _params(0, n=80))])
    out = plain[0]
    # a stop token that first appears mid-stream, and max_tokens inside an accepted run
    stop_at = next(i for i in range(5, len(out)) if out[i] not in out[:i]) if len(set(out)) > 1 else None
    cases = [_params(6, n=7), _params(6, n=1)]
    if stop_at is not None:
        cases.append(SamplingParams(temperature=0.0, max_tokens=80, num_speculative_tokens=6,
                                    stop_token_ids=(out[stop_at],)))
    got, fins = _run(path, [(PROMPTS[0], sp) for sp in cases])
    assert got[0] == out[:7] and fins[0].reason == "length"
    assert got[1] == out[:1] and fins[1].reason == "length"
    if stop_at is not None:
        assert got[2] == out[: stop_at + 1] and fins[2].reason == "stop"


def test_speculation_stops_on_a_stop_string_like_plain_decoding(path, tiny_gguf):
    model = Model(path, max_batch=4)
    prompt = PROMPTS[1]
    full = [t for t in Generation(model, prompt, _params(0, n=40))]
    text = "".join(t.text for t in full)
    stop = next(t.text for t in full[len(full) // 2 :] if t.text.strip())
    runs = {}
    for k in (0, 5):
        g = Generation(model, prompt, _params(k, n=40, stop=(stop,)))
        toks = list(g)
        runs[k] = ([t.id for t in toks], "".join(t.text for t in toks), g.stats.finish_reason)
    assert runs[5] == runs[0]
    assert runs[0][2] == "stop" and stop not in runs[0][1]


def test_single_stream_generation_is_unchanged_by_speculation(path):
    model = Model(path, max_batch=4)
    for prompt in PROMPTS:
        plain = [t.id for t in Generation(model, prompt, _params(0, n=50))]
        g = Generation(model, prompt, _params(5, n=50))
        assert [t.id for t in g] == plain
    assert g.stats.spec_steps > 0 and g.stats.mean_accepted_length >= 1.0
    assert model.kv.allocator.num_used == 0


@pytest.mark.real_model
def test_real_model_greedy_is_unchanged_by_speculation(real_model_path):
    from engine.generate import prompt_ids

    model = Model(real_model_path, max_batch=8, kv_blocks=256)
    code = ("def area(width, height):\n    result = width * height\n    return result\n\n"
            "print(area(3, 4))\n")
    prompt = prompt_ids(model, f"Rename the function area to rect_area:\n\n{code}\n", raw=False)
    plain = [t.id for t in Generation(model, prompt, _params(0, n=40))]
    g = Generation(model, prompt, _params(5, n=40))
    assert [t.id for t in g] == plain
    # in a batch, beside a plain sequence, through the scheduler
    from engine.scheduler import Scheduler, SchedulerConfig, iter_events

    events = []
    sched = Scheduler(model, SchedulerConfig(max_batch=8),
                      publish=lambda items, quiet: events.extend(iter_events(items)))
    other = prompt_ids(model, "Write a short poem about the sea.")
    reqs = [Request(prompt, _params(5, n=40)), Request(other, _params(0, n=40))]
    for r in reqs:
        sched.submit(r)
    run(sched)
    got, fins = outputs(events, reqs)
    assert got[0] == plain
    assert got[1] == [t.id for t in Generation(model, other, _params(0, n=40))]
    assert fins[0].stats.spec_steps > 0


# ------------------------------------------------------------------------------- sampling


class _Tok:
    eos_id = None


def _policy(**kw):
    params = SamplingParams(max_tokens=10, **kw)
    return StreamPolicy(params, 6, _Tok(), None, end=10**6)


def test_rejection_rule_keeps_the_target_distribution():
    """k = 2 point-mass drafts against fixed rows: the first token follows row 0's distribution;
    given the first draft accepted, the second follows row 1's (what plain sampling would draw
    from); given both accepted, the bonus follows row 2's."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 6)).astype(np.float32) * 1.5
    drafts = [2, 4]
    p = [np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in logits.astype(np.float64)]
    firsts, seconds, thirds = collections.Counter(), collections.Counter(), collections.Counter()
    N = 6000
    for seed in range(N):
        pol = _policy(temperature=1.0, seed=seed)
        sp = Speculator(2, 2, 5)
        sp.drafts[:] = drafts
        toks = np.zeros(10, np.int32)
        m, acc, _ = sp.accept(pol, logits, logits.argmax(1), toks, 3, 2)
        firsts[int(toks[3])] += 1
        if toks[3] == drafts[0]:
            seconds[int(toks[4])] += 1
            if toks[4] == drafts[1]:
                thirds[int(toks[5])] += 1
                assert m == 3 and acc == 2
    for counts, target in ((firsts, p[0]), (seconds, p[1]), (thirds, p[2])):
        n = sum(counts.values())
        freq = np.array([counts[i] for i in range(6)]) / n
        tv = 0.5 * np.abs(freq - target).sum()
        assert tv < 3.0 * np.sqrt(6 / n), (tv, n, freq, target)  # ~6 standard errors of TV
        # chi-square over the 6 outcomes (5 dof: 99.9th percentile 20.5)
        chi2 = (((freq - target) * n) ** 2 / (target * n)).sum()
        assert chi2 < 20.5, (chi2, freq, target)


def test_sampled_speculation_matches_plain_sampling_on_a_tiny_model(path):
    """End to end on the tiny model: the first three tokens' joint distribution (top_k=3, so 27
    outcomes) with speculation is that of plain sampling, over seeded runs."""
    model = Model(path, max_batch=4)
    # a prompt that ends in a run the model likes to continue: the drafts are often accepted
    prompt = PROMPTS[0] + [t.id for t in Generation(model, PROMPTS[0], _params(0, n=6))]
    counts = {}
    accepted = 0
    N = 700
    for k in (0, 3):
        c = collections.Counter()
        for seed in range(N):
            g = Generation(model, prompt, SamplingParams(temperature=1.5, top_k=3, seed=seed,
                                                         max_tokens=3, ignore_eos=True,
                                                         num_speculative_tokens=k))
            c[tuple(t.id for t in g)] += 1
            accepted += g.stats.spec_accepted_tokens
        counts[k] = c
    assert accepted > N // 10  # drafts were proposed and often accepted: the rule was exercised
    keys = set(counts[0]) | set(counts[3])
    a = np.array([counts[0][x] for x in keys]) / N
    b = np.array([counts[3][x] for x in keys]) / N
    tv = 0.5 * np.abs(a - b).sum()
    assert tv < 0.12, tv  # two samples of 700 over <= 27 outcomes: noise TV ~0.06


def test_sampled_speculation_is_reproducible_with_a_seed(path):
    model = Model(path, max_batch=4)
    sp = SamplingParams(temperature=1.0, seed=7, max_tokens=30, ignore_eos=True, num_speculative_tokens=4)
    a = [t.id for t in Generation(model, PROMPTS[0], sp)]
    b = [t.id for t in Generation(model, PROMPTS[0], sp)]
    assert a == b


# ------------------------------------------------------------------------------- the API


def test_validation_names_the_field_and_the_limit():
    from engine.server.validate import Invalid, sampling_params
    from protos import wafer_pb2 as pb

    kw = dict(vocab_size=320, context_length=256, prompt_len=4)
    p = sampling_params(pb.SamplingParams(), **kw)
    assert p.num_speculative_tokens is None and (p.prompt_lookup_min, p.prompt_lookup_max) == (2, 5)
    p = sampling_params(pb.SamplingParams(num_speculative_tokens=0, prompt_lookup_max=1), **kw)
    assert p.num_speculative_tokens == 0 and (p.prompt_lookup_min, p.prompt_lookup_max) == (1, 1)
    for sp, msg in ((pb.SamplingParams(num_speculative_tokens=17), "num_speculative_tokens=17 must be in [0, 16]"),
                    (pb.SamplingParams(num_speculative_tokens=-1), "num_speculative_tokens=-1 must be in [0, 16]"),
                    (pb.SamplingParams(prompt_lookup_max=17), "prompt_lookup_max=17 must be in [1, 16]"),
                    (pb.SamplingParams(prompt_lookup_min=4, prompt_lookup_max=3),
                     "prompt_lookup_min=4 must be in [1, prompt_lookup_max=3]"),
                    (pb.SamplingParams(prompt_lookup_min=0), "prompt_lookup_min=0 must be in [1,")):
        with pytest.raises(Invalid) as e:
            sampling_params(sp, **kw)
        assert msg in e.value.message


def test_server_default_usage_and_metrics(path):
    from engine.client import WaferClient
    from engine.server.app import ServerOptions
    from engine.server.registry import ModelEntry, Registry
    from engine.server.testing import ServerThread
    from serving import scrape, split

    reg = Registry([ModelEntry(name="tiny", path=str(path), max_batch=8)])
    with ServerThread(reg, ServerOptions(port=0, metrics_port=0, speculate=4)) as srv:
        with WaferClient(srv.address, timeout=60) as c:
            ids = PROMPTS[0]
            plain, pf = split(list(c.generate(token_ids=ids, max_tokens=40, temperature=0,
                                              num_speculative_tokens=0)))
            spec, sf = split(list(c.generate(token_ids=ids, max_tokens=40, temperature=0)))  # default
            assert [t.id for t in spec] == [t.id for t in plain]
            u = sf.usage
            assert pf.usage["spec_steps"] == 0
            assert u["spec_steps"] > 0 and u["spec_draft_tokens"] >= u["spec_accepted_tokens"] > 0
            assert u["spec_acceptance_rate"] == pytest.approx(u["spec_accepted_tokens"] / u["spec_draft_tokens"], rel=1e-6)
            assert u["spec_mean_accepted_length"] == pytest.approx(1 + u["spec_accepted_tokens"] / u["spec_steps"], rel=1e-6)
            m = scrape(srv.metrics_url)
            lbl = '{model_name="tiny"}'
            assert m[f"wafer_spec_decode_num_drafts_total{lbl}"] == u["spec_steps"]
            assert m[f"wafer_spec_decode_num_draft_tokens_total{lbl}"] == u["spec_draft_tokens"]
            assert m[f"wafer_spec_decode_num_accepted_tokens_total{lbl}"] == u["spec_accepted_tokens"]
            assert m[f'wafer_spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="0"}}'] > 0
            assert 0 < m[f"wafer_spec_decode_acceptance_rate{lbl}"] <= 1


# ------------------------------------------------------------------------------- the simulator


def test_sim_models_a_verify_pass_and_tokens_per_pass():
    from sim.clock import WaferClock
    from sim.timing import summarize_speculation, tokens_per_pass

    assert tokens_per_pass(0.0, 4) == 1.0 and tokens_per_pass(1.0, 4) == 5.0
    assert tokens_per_pass(0.5, 2) == pytest.approx(1.75)
    clock = WaferClock.from_spec("wse3:llama-3.1-8b")
    tm = clock.timing
    one, four = tm.itl_cycles(600), tm.verify_cycles(600, 4)
    assert one < four < 5 * one  # k + 1 tokens stream through the pipeline behind each other
    assert tm.verify_cycles(600, 4) == tm.token_cycles(600) + 4 * tm.bottleneck_cycles(600)
    assert clock.itl_us(600, drafts=4) > clock.itl_us(600)
    q = summarize_speculation(tm, 512, 256, 1, 4, 0.8)
    assert q["speedup"] > 2 and q["tokens_per_pass"] == pytest.approx(tokens_per_pass(0.8, 4))
    assert summarize_speculation(tm, 512, 256, 1, 4, 0.0)["speedup"] < 1  # drafts never accepted


def test_sim_run_speculate_cli(capsys):
    import json

    from sim.cli import main

    assert main(["run", "--model", "llama-3.1-8b", "--speculate", "4", "--acceptance", "0.7",
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["speculation"]
    assert s["drafts"] == 4 and s["tokens_per_pass"] == pytest.approx(1 + .7 + .49 + .343 + .2401)
    assert main(["run", "--model", "llama-3.1-8b", "--speculate", "4", "--acceptance", "1.5"]) == 2
    assert "--acceptance 1.5 must be in [0, 1]" in capsys.readouterr().err


def test_emulated_stream_stamps_a_verify_pass_tokens_with_its_time():
    from engine.server.emulation import Emulator

    emu = Emulator("wse3:llama-3.1-8b", pace="none")
    s = emu.stream(0, 100, 0)
    first = s.next_time_us(1)
    t1 = s.next_time_us(1, spec_k=3, spec_index=0)   # a pass of 3 drafts: its first token
    t2 = s.next_time_us(1, spec_k=3, spec_index=1)   # accepted with it: same time
    t3 = s.next_time_us(1, spec_k=3, spec_index=2)
    t4 = s.next_time_us(1)                           # a plain step after
    assert t1 == t2 == t3 and t1 - first == round(emu.clock.itl_us(101, drafts=3))
    assert t4 > t3 and s.n == 5
