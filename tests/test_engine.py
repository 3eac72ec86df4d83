"""The Numba engine against the float64 numpy reference, on synthetic files of every format and
on the real model; the batched step against independent single steps."""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import UnsupportedModel
from engine import kernels as K
from engine.model import Model
from reference import reference_logits
from synthetic import WEIGHT_TYPES

# float32 activations against a float64 reference: the largest logit error, relative to the
# largest logit, stays under 1e-5 (measured ~3e-7 on the synthetic files). Both sides read the
# same quantized weights, so this checks the arithmetic, not the quantization.
LOGIT_RTOL = 1e-5

PROMPT = [5, 17, 80, 200, 33, 7, 150, 301, 42, 99, 12, 260, 71, 3, 18, 90, 222, 64]
# long enough that a one-chunk prefill takes the dequantize-and-multiply path
LONG_PROMPT = (PROMPT * 3)[:40]


def max_rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def models(tiny_gguf):
    cache = {}

    def get(weight_type, **kw):
        key = (weight_type, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = Model(tiny_gguf(weight_type, **kw), max_batch=16, kv_blocks=64, max_chunk=64)
        return cache[key]

    return get


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_prefill_logits_match_reference(models, tiny_gguf, weight_type):
    model = models(weight_type)
    want = reference_logits(tiny_gguf(weight_type), LONG_PROMPT)
    got = model.logits(LONG_PROMPT)  # one step of 40 tokens: the matrix path
    assert got.shape == want.shape
    assert max_rel_err(got, want) < LOGIT_RTOL


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
def test_decode_logits_match_reference(models, tiny_gguf, weight_type):
    """Prefill 2 tokens, then decode the rest one at a time (matrix-vector kernels)."""
    model = models(weight_type)
    want = reference_logits(tiny_gguf(weight_type), PROMPT)
    blocks = model.kv.allocator.allocate(model.kv.blocks_for(len(PROMPT)))
    try:
        table = np.array(blocks, np.int32)
        got = [model.prefill(np.array(PROMPT[:2]), table, 0).copy()]
        for pos in range(2, len(PROMPT)):
            got.append(model.decode(np.array([PROMPT[pos]]), np.array([pos]), table[None])[0].copy())
    finally:
        model.kv.allocator.free(blocks)
    assert max_rel_err(np.array(got), want[1:]) < LOGIT_RTOL


def test_untied_head_and_mixed_embedding_format(models, tiny_gguf):
    path = tiny_gguf("Q4_1", embed_type="Q8_0", tied=False)
    model = models("Q4_1", embed_type="Q8_0", tied=False)
    assert not model.config.tied_embeddings
    assert max_rel_err(model.logits(PROMPT), reference_logits(path, PROMPT)) < LOGIT_RTOL


def test_long_prompt_is_chunked(models, tiny_gguf):
    """A prompt longer than max_chunk (64) runs in several steps and still matches."""
    prompt = (PROMPT * 8)[:140]
    model = models("Q8_0")
    assert max_rel_err(model.logits(prompt), reference_logits(tiny_gguf("Q8_0"), prompt)) < LOGIT_RTOL


def test_a_token_id_outside_the_vocabulary_is_refused(models):
    """The embedding lookup does not bounds-check, so the step does: a bad id once read past
    the table and gave NaN logits."""
    model = models("Q8_0")
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary of {vocab}"):
            model.logits([1, bad, 2])
    assert np.isfinite(model.logits(PROMPT)).all()


@pytest.mark.parametrize("n_seqs", [K.GEMV_MAX_TOKENS, 13])  # matrix-vector and matrix paths
@pytest.mark.parametrize("weight_type", ["Q4_1", "Q8_0"])
def test_batched_decode_equals_single_steps(models, weight_type, n_seqs):
    """B sequences of different lengths in one step give each the logits it gets alone."""
    model = models(weight_type)
    rng = np.random.default_rng(1)
    lengths = [1, 5, 17, 30, 9, 3, 2, 11, 4, 25, 7, 1, 14][:n_seqs]
    seqs = [rng.integers(0, model.config.vocab_size, n + 1).astype(np.int32) for n in lengths]
    alloc = model.kv.allocator
    tables = np.zeros((len(seqs), 4), np.int32)
    owned = []
    try:
        for i, s in enumerate(seqs):
            blocks = alloc.allocate(model.kv.blocks_for(len(s)))
            owned.append(blocks)
            tables[i, : len(blocks)] = blocks
            logits = model.prefill(s[:-1], tables[i], 0)
            assert model.picks[0] == logits.argmax()  # the greedy pick of the prompt's last token
        last = np.array([s[-1] for s in seqs], np.int32)
        pos = np.array(lengths, np.int32)
        batched = model.decode(last, pos, tables).copy()
        np.testing.assert_array_equal(model.picks[: len(seqs)], batched.argmax(axis=1))
        for i in range(len(seqs)):
            single = model.decode(last[i : i + 1], pos[i : i + 1], tables[i : i + 1])[0]
            np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-5 * np.abs(single).max())
    finally:
        for blocks in owned:
            alloc.free(blocks)
    assert alloc.num_used == 0


def test_config_from_header(models):
    cfg = models("F32").config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (2, 64, 4, 2, 16)
    assert cfg.d_ffn == 128 and cfg.context_length == 256 and cfg.tied_embeddings


def test_unsupported_architecture_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "x.gguf", "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((32, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModel, match="architecture 'gpt2'"):
        Model(tmp_path / "x.gguf")


@pytest.fixture(scope="module")
def real_model(real_model_path):
    return Model(real_model_path, max_batch=4, kv_blocks=256)


def test_real_model_answers_paris(real_model):
    from engine.generate import Generation, prompt_ids
    from engine.sampling import SamplingParams

    gen = Generation(real_model, prompt_ids(real_model, "What is the capital of France?"),
                     SamplingParams(temperature=0.0, max_tokens=20))
    text = "".join(t.text for t in gen)
    assert text == "The capital of France is Paris."
    assert gen.stats.finish_reason == "stop"


def test_real_model_logits_match_reference(real_model, real_model_path):
    ids = real_model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    want = reference_logits(real_model_path, ids)
    got = real_model.logits(ids)
    assert max_rel_err(got, want) < LOGIT_RTOL
    assert (got.argmax(1) == want.argmax(1)).all()


def test_decode_on_two_threads_gives_the_bits_of_one(tiny_gguf):
    """Decode steps of a few tokens on two threads equal one thread's, bit for bit, over many
    steps at growing context (the server picks the thread count per step: results must not
    depend on it)."""
    import numba

    path = tiny_gguf("Q4_1", context_length=1024)
    model = Model(path, max_batch=4, kv_blocks=256, threads=2)
    if model.threads < 2:
        pytest.skip("needs two Numba threads")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 300, n).astype(np.int32) for n in (200, 120)]
    logits = {}
    for threads in (1, 2):
        model.step_threads = {"few": threads, "batch": threads}
        tables, toks, pos, steps = [], [], [], []
        for p in prompts:
            blocks = model.kv.allocator.allocate(model.kv.blocks_for(len(p) + 301))
            tables.append(np.array(blocks, np.int32))
            last = model.prefill(p, tables[-1], 0)
            toks.append(int(np.argmax(last)))
            pos.append(len(p))
        table = np.stack([np.pad(t, (0, max(map(len, tables)) - len(t))) for t in tables])
        for _ in range(300):
            out = model.decode(np.array(toks, np.int32), np.array(pos, np.int32), table)
            steps.append(out.copy())
            toks = [int(t) for t in np.argmax(out, axis=1)]
            pos = [q + 1 for q in pos]
        for t in tables:
            model.kv.allocator.free(t.tolist())
        logits[threads] = np.stack(steps)
        assert np.isfinite(logits[threads]).all()
    np.testing.assert_array_equal(logits[1], logits[2])
    numba.set_num_threads(model.threads)
