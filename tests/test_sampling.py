"""Sampling parameters, reproducibility and stop handling (no model needed beyond a tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sampling import Sampler, SamplingParams, StopChecker, logprobs_topn

V = 1000


def logits(seed=0):
    return np.random.default_rng(seed).standard_normal(V).astype(np.float32) * 3


def draws(params, n=200, seed=0):
    s = Sampler(params, V)
    lg = logits(seed)
    return [s.sample(lg) for _ in range(n)]


def test_greedy_is_argmax():
    lg = logits()
    assert Sampler(SamplingParams(temperature=0.0), V).sample(lg) == int(np.argmax(lg))


def test_same_seed_same_tokens_and_different_seed_differs():
    p = dict(temperature=1.0, top_p=0.95)
    assert draws(SamplingParams(seed=7, **p)) == draws(SamplingParams(seed=7, **p))
    assert draws(SamplingParams(seed=7, **p)) != draws(SamplingParams(seed=8, **p))


def test_top_k_limits_choices_to_the_k_best():
    lg = logits()
    best5 = set(np.argsort(-lg)[:5].tolist())
    got = set(draws(SamplingParams(temperature=5.0, top_k=5, seed=1), n=500))
    assert got <= best5 and len(got) > 1


def test_top_p_keeps_the_smallest_set_reaching_p():
    lg = np.full(V, -20.0, np.float32)
    lg[[3, 9, 11]] = [2.0, 1.0, 0.0]  # probabilities ~0.665, 0.245, 0.090
    assert {Sampler(SamplingParams(top_p=0.5, seed=s), V).sample(lg) for s in range(50)} == {3}
    got = {Sampler(SamplingParams(top_p=0.8, seed=s), V).sample(lg) for s in range(200)}
    assert got == {3, 9}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    lg = np.full(V, -20.0, np.float32)
    lg[[3, 9]] = [2.0, 0.0]  # p(9)/p(3) = e^-2 = 0.135
    assert {Sampler(SamplingParams(min_p=0.2, seed=s), V).sample(lg) for s in range(100)} == {3}
    assert {Sampler(SamplingParams(min_p=0.1, seed=s), V).sample(lg) for s in range(100)} == {3, 9}


def test_repetition_penalty_discourages_seen_tokens():
    lg = np.zeros(V, np.float32)
    lg[[4, 5]] = [2.0, 1.9]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    assert Sampler(params, V).sample(lg, history=np.array([4], np.int32)) == 5
    assert Sampler(params, V).sample(lg, history=np.array([7], np.int32)) == 4


def test_logprobs_are_normalised_and_sorted():
    lg = logits()
    chosen, top = logprobs_topn(lg, int(np.argmax(lg)), 5)
    full = lg.astype(np.float64) - np.log(np.exp(lg.astype(np.float64)).sum())
    assert chosen == pytest.approx(full.max(), abs=1e-5)
    assert [t for t, _ in top] == np.argsort(-lg)[:5].tolist()
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


@pytest.mark.parametrize("field,value,needle", [
    ("top_p", 0.0, "top_p=0 must be in (0, 1]"),
    ("top_p", 1.5, "top_p=1.5"),
    ("temperature", -1.0, "temperature=-1 must be in [0, 100]"),
    ("top_k", V + 1, f"top_k={V + 1} must be in [0, {V}]"),
    ("max_tokens", 0, "max_tokens=0"),
    ("max_tokens", 5000, "exceeds the model's context of 2048"),
    ("stop_token_ids", (V,), f"stop_token_ids[0]={V} is outside the vocabulary [0, {V})"),
    ("top_p", 1.0000001, "top_p=1.0000001 must be in (0, 1]"),
    ("temperature", float("nan"), "temperature=nan must be a finite number"),
    ("stop", ("x" * 257,), "stop[0] has 257 characters, limit 256"),
    ("logprobs", 50, "logprobs=50"),
    ("repetition_penalty", 0.0, "repetition_penalty=0 must be in (0, 10]"),
])
def test_validation_names_the_field_and_the_limit(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        SamplingParams(**{field: value}).validate(V, 2048, prompt_len=10)


def test_stop_string_is_cut_and_never_partially_emitted(real_tokenizer):
    tok = real_tokenizer
    ids = tok.encode("Paris is nice. END here")
    stop = StopChecker(SamplingParams(stop=(". END",), max_tokens=100), tok, tok.eos_id)
    out, reason = "", None
    for i in ids:
        delta, reason = stop.push(i)
        assert ". E" not in out + delta or reason
        out += delta
        if reason:
            break
    assert out == "Paris is nice" and reason == "stop"


def test_eos_and_max_tokens_finish(real_tokenizer):
    tok = real_tokenizer
    stop = StopChecker(SamplingParams(max_tokens=3), tok, tok.eos_id)
    assert stop.push(tok.encode("Hi")[0])[1] is None
    assert stop.push(tok.eos_id) == ("", "stop")
    stop = StopChecker(SamplingParams(max_tokens=2), tok, tok.eos_id)
    ids = tok.encode("one two three")
    assert stop.push(ids[0])[1] is None
    assert stop.push(ids[1])[1] == "length"


def _reference_probs(logits, history, temperature, top_k=0, top_p=1.0, min_p=0.0, rep=1.0):
    """The target distribution in float64 numpy, processors in the documented order."""
    w = logits.astype(np.float64).copy()
    if rep != 1.0 and len(history):
        seen = np.unique(history)
        w[seen] = np.where(w[seen] > 0, w[seen] / rep, w[seen] * rep)
    s = (w - w.max()) / temperature
    keep = s >= -30.0
    if 0 < top_k < keep.sum():
        order = np.lexsort((np.arange(s.size), -s))  # best first, ties by lower id
        keep[:] = False
        keep[order[:top_k]] = True
    p = np.where(keep, np.exp(s), 0.0)
    if top_p < 1.0:
        order = np.lexsort((np.arange(p.size), -p))
        cum = np.cumsum(p[order]) / p.sum()
        n = int(np.searchsorted(cum, top_p)) + 1
        p[order[n:]] = 0.0
    if min_p > 0.0:
        p[p < min_p * p.max()] = 0.0
    return p / p.sum()


class _GridRng:
    """Stands in for the sampler's generator: hands out given uniform draws in order."""

    def __init__(self, draws):
        self._draws = iter(draws)

    def random(self):
        return next(self._draws)


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=0.8, top_k=40),
    dict(temperature=1.3, top_k=200, top_p=0.8, min_p=0.05), dict(temperature=0.9, rep=1.3),
    dict(temperature=2.0, min_p=0.2),
])
def test_sampler_draws_the_reference_distribution(kw):
    """Draws at evenly spaced u cover the sampler's cumulative distribution: each token's share of
    them must be its reference probability (float64 numpy) to within the grid's resolution."""
    rng = np.random.default_rng(5)
    V = 4000
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    history = rng.integers(0, V, 300).astype(np.int32)
    kw = dict(kw)
    T, rep = kw.pop("temperature"), kw.pop("rep", 1.0)
    ref = _reference_probs(logits, history, T, rep=rep, **kw)
    N = 10000
    sampler = Sampler(SamplingParams(temperature=T, repetition_penalty=rep, **kw), V)
    sampler._rng = _GridRng((np.arange(N) + 0.5) / N)
    counts = np.zeros(V)
    for _ in range(N):
        counts[sampler.sample(logits, history)] += 1
    assert np.abs(counts / N - ref).max() < 2.0 / N + 1e-4
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(ref))


def test_draw_lands_where_the_cumulative_mass_says():
    """The chunked draw picks the same token as a full running sum, for draws across the range."""
    from engine.sampling import DRAW_CHUNK, _draw

    rng = np.random.default_rng(3)
    for n in (1, 7, DRAW_CHUNK, DRAW_CHUNK + 1, 5 * DRAW_CHUNK + 17):
        probs = rng.random(n).astype(np.float32) ** 4  # uneven masses, some tiny
        cum = np.cumsum(probs, dtype=np.float64)
        for u in np.concatenate([rng.random(300), [0.0, 1.0 - 1e-12]]):
            target = u * cum[-1]
            i = _draw(probs, float(u))
            assert 0 <= i < n
            lo = cum[i - 1] if i else 0.0
            tol = 1e-9 * cum[-1]  # summation order may differ in the last bits
            assert lo - tol <= target <= cum[i] + tol, (n, u, i)
