"""Batch invariance: in each numeric mode a sequence's logits are the same bits whether it runs
alone or inside any decode batch, whatever the prefill chunking, and a multi-token verify step
gives the logits of decoding those tokens one by one (engine/simd.py: one arithmetic per
(row, token) dot in every kernel path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.model import Model

# synthetic shapes with a row count that is not a multiple of 4 (vocab), column counts with
# both full 4-block vectors and leftover blocks (192 = 6 blocks, 320 = 10), several tiles
SHAPES = dict(d_model=192, n_heads=4, n_kv_heads=2, d_ffn=320, vocab_size=322, n_layers=2)


@pytest.fixture(scope="module")
def models(tiny_gguf, real_model_path):
    cache = {}

    def get(which, numerics):
        if (which, numerics) not in cache:
            path = real_model_path if which == "real" else tiny_gguf(which, **SHAPES)
            cache[which, numerics] = Model(path, max_batch=33, kv_blocks=512, max_chunk=64,
                                           numerics=numerics)
        return cache[which, numerics]

    return get


def _alloc(model, n):
    return np.array(model.kv.allocator.allocate(model.kv.blocks_for(n)), np.int32)


def run_batch(model, prompts, steps, forced=None):
    """Prefill each prompt, then `steps` greedy decode steps of the whole batch; returns the
    logits [steps + 1, B, vocab] (step 0: the prefill's last token). `forced` [steps, B]
    feeds given tokens instead of the greedy ones."""
    width = max(model.kv.blocks_for(len(p) + steps) for p in prompts)
    tables = np.zeros((len(prompts), width), np.int32)
    owned = []
    try:
        out = [np.zeros((len(prompts), model.config.vocab_size), np.float32) for _ in range(steps + 1)]
        for i, p in enumerate(prompts):
            blocks = _alloc(model, len(p) + steps)
            owned.append(blocks)
            tables[i, : blocks.size] = blocks
            out[0][i] = model.prefill(np.array(p, np.int32), tables[i], 0)
        pos = np.array([len(p) for p in prompts], np.int32)
        tok = out[0].argmax(1).astype(np.int32)
        for s in range(steps):
            if forced is not None:
                tok = forced[s]
            out[s + 1][:] = model.decode(tok, pos, tables)
            tok = model.picks[: len(prompts)].astype(np.int32)
            pos += 1
    finally:
        for blocks in owned:
            model.kv.allocator.free(blocks.tolist())
    return np.stack(out)


CASES = [("Q4_1", "exact"), ("Q4_1", "fast"), ("Q8_0", "exact"), ("Q8_0", "fast"),
         ("real", "exact"), ("real", "fast")]


@pytest.mark.parametrize("which,numerics", CASES)
def test_alone_equals_inside_random_batches(models, which, numerics):
    """The same prompt alone and at a random place among 1-32 other random prompts (random
    lengths): its logits at every step are bitwise equal, so its greedy text is too."""
    model = models(which, numerics)
    rng = np.random.default_rng(hash((which, numerics)) % 2**32)
    vocab = model.config.vocab_size
    prompt = rng.integers(0, vocab, 23).tolist()
    steps = 4
    alone = run_batch(model, [prompt], steps)[:, 0]
    for n_others in (1, int(rng.integers(2, 16)), 32):
        others = [rng.integers(0, vocab, int(rng.integers(1, 40))).tolist() for _ in range(n_others)]
        at = int(rng.integers(0, n_others + 1))
        batch = run_batch(model, others[:at] + [prompt] + others[at:], steps)[:, at]
        assert (batch.argmax(-1) == alone.argmax(-1)).all()
        np.testing.assert_array_equal(batch, alone, err_msg=f"{n_others} others, at {at}")


@pytest.mark.parametrize("which,numerics", CASES)
def test_chunked_prefill_and_verify_step_equal_one_by_one(models, which, numerics):
    """A prompt's per-token logits are the same bits prefilled whole (64-token chunks),
    in uneven chunks (1, 3, 5, 9, ...), and decoded one token at a time (a verify step of
    several tokens == those tokens decoded one by one)."""
    model = models(which, numerics)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, model.config.vocab_size, 150).astype(np.int32)
    table = _alloc(model, tokens.size)
    try:
        whole = model.prefill(tokens, table, 0, all_logits=True)
        chunked, c0 = [], 0
        for size in (1, 3, 5, 9, 2, 30, 64, 36):
            chunked.append(model.prefill(tokens[c0 : c0 + size], table, c0, all_logits=True))
            c0 += size
        assert c0 == tokens.size
        np.testing.assert_array_equal(np.concatenate(chunked), whole)
        one_by_one = [model.prefill(tokens[:1], table, 0, all_logits=True)[0]]
        for p in range(1, tokens.size):
            one_by_one.append(model.decode(tokens[p : p + 1], np.array([p], np.int32), table[None])[0].copy())
        np.testing.assert_array_equal(np.stack(one_by_one), whole)
    finally:
        model.kv.allocator.free(table.tolist())


def test_negative_control_other_arithmetic_is_detected(models):
    """The comparisons above are bitwise: the other mode's arithmetic on the same sequence in
    the same batch is caught (a check that could not fail would pass this too)."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 322, 20).tolist() for _ in range(5)]
    forced = rng.integers(0, 322, (3, 5)).astype(np.int32)
    exact = run_batch(models("Q4_1", "exact"), prompts, 3, forced)
    fast = run_batch(models("Q4_1", "fast"), prompts, 3, forced)
    assert (exact != fast).any(axis=-1).all()  # every row of every step differs somewhere
    np.testing.assert_allclose(fast, exact, atol=0.2 * np.abs(exact).max())  # yet both are the model


ISA_SCRIPT = """
import sys, numpy as np
from engine.cpu import ISA
from engine.model import Model
print(ISA)
m = Model(sys.argv[1], max_batch=4, kv_blocks=64, max_chunk=64, numerics="fast")
np.save(sys.argv[2], m.logits(list(range(1, 40))))
"""


def test_portable_int8_kernel_gives_the_vnni_bits(tiny_gguf, tmp_path):
    """The portable integer dot (plain LLVM IR, for CPUs without AVX512-VNNI) and vpdpbusd
    compute the same exact integer sums: fast-mode logits are bitwise equal across the two.
    Each side compiles afresh in its own process: kernels loaded from Numba's on-disk cache have
    been seen to differ from freshly compiled ones in the last bits (~4e-6; not understood yet),
    which would make this comparison depend on what an earlier run left in the cache."""
    path = tiny_gguf("Q4_1", **SHAPES)
    isas, out = {}, {}
    for forced in ("", "portable"):
        env = dict(os.environ, WAFER_ISA=forced, PYTHONPATH=str(Path(__file__).parents[1]),
                   NUMBA_CACHE_DIR=str(tmp_path / f"numba-{forced or 'native'}"))
        run = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(path), str(tmp_path / f"{forced}.npy")],
                             env=env, check=True, timeout=900, capture_output=True, text=True)
        isas[forced] = run.stdout.split()[-1]
        out[forced] = np.load(tmp_path / f"{forced}.npy")
    assert isas["portable"] == "portable" and isas[""] in ("vnni", "portable")
    np.testing.assert_array_equal(out[""], out["portable"])
