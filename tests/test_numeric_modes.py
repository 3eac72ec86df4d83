"""The two numeric modes of Model(numerics=...): exact (float32 activations; test_engine.py holds
it to 1e-5 of the float64 reference) and fast (int8 activations per 32-block, integer dot
products). Fast mode's products are checked against the same quantization done in numpy, and
the model against the reference with the looser bound its int8 activations allow."""

from __future__ import annotations

import numpy as np
import pytest

from engine import kernels as K
from engine.model import NUMERICS, Model
from reference import reference_logits

SHAPES = dict(d_model=192, n_heads=4, n_kv_heads=2, d_ffn=320, vocab_size=322, n_layers=2)


def test_unknown_mode_is_refused(tiny_gguf):
    with pytest.raises(ValueError, match="numerics='bf16'"):
        Model(tiny_gguf("Q4_1"), numerics="bf16")
    assert NUMERICS == ("exact", "fast")


def quantized_activations(x: np.ndarray) -> np.ndarray:
    """llama.cpp's Q8_1/Q8_0 activation rounding in float64: per 32-block, d = max|x| / 127,
    q = round(x / d) (half away from zero... here: floor(x/d + 0.5), as the kernel), x ~ q d."""
    xb = x.reshape(x.shape[0], -1, 32).astype(np.float64)
    d = (np.abs(xb).max(-1, keepdims=True) / 127).astype(np.float32).astype(np.float64)
    inv = np.where(d > 0, (1 / d.astype(np.float32)).astype(np.float64), 0)
    q = np.floor((xb * inv).astype(np.float32) + np.float32(0.5))
    return (q * d).reshape(x.shape)


@pytest.mark.parametrize("weight_type", ["Q4_1", "Q4_0", "Q8_0"])
@pytest.mark.parametrize("n_tok", [1, 3, 6, 21])
def test_fast_products_equal_int8_activations_times_weights(tiny_gguf, weight_type, n_tok):
    """Every fast-mode product (all row/column tails: 322 rows, 6 and 10 blocks) equals the
    dequantized weights times the int8-quantized activations, to float32 rounding."""
    model = Model(tiny_gguf(weight_type, **SHAPES), max_batch=32, kv_blocks=64, max_chunk=32, numerics="fast")
    buf = model.buffers
    rng = np.random.default_rng(n_tok)
    for name in ("qkv", "down", "head"):
        w = getattr(model.weights, name)
        x = rng.standard_normal((32, w.cols)).astype(np.float32)
        out = np.zeros((32, w.rows), np.float32)
        K.matmul(w, 0, x, n_tok, out, buf.wtiles, buf.act, True)
        dense = np.zeros((w.rows, w.cols), np.float32)
        for r in range(w.rows):
            K.dequant_row(w, 0, r, dense[r])
        want = quantized_activations(x[:n_tok]) @ dense.T.astype(np.float64)
        assert np.abs(out[:n_tok] - want).max() <= 1e-5 * np.abs(want).max(), name
        exact = x[:n_tok].astype(np.float64) @ dense.T.astype(np.float64)
        assert np.abs(out[:n_tok] - exact).max() > 0  # the activations really were quantized


@pytest.mark.parametrize("weight_type", ["Q4_1", "Q8_0"])
def test_fast_model_tracks_reference(tiny_gguf, weight_type):
    path = tiny_gguf(weight_type, **SHAPES)
    prompt = list(range(3, 60, 2))
    want = reference_logits(path, prompt)
    fast = Model(path, max_batch=4, kv_blocks=64, numerics="fast").logits(prompt)
    exact = Model(path, max_batch=4, kv_blocks=64, numerics="exact").logits(prompt)
    err_fast = np.abs(fast - want).max() / np.abs(want).max()
    err_exact = np.abs(exact - want).max() / np.abs(want).max()
    assert err_fast < 0.05  # int8 activations: ~1e-2 on random weights
    assert err_exact < 1e-5 < err_fast


def test_fast_real_model_keeps_the_greedy_choices(real_model_path):
    """On the real model, fast mode's argmax matches the float64 reference at nearly every
    position of a sentence, and its top-5 logits stay within llama.cpp's error (~1 logit)."""
    model = Model(real_model_path, max_batch=4, kv_blocks=256, numerics="fast")
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it runs "
                                 "into the forest to find something to eat before the night falls.")
    want = reference_logits(real_model_path, ids)
    got = model.logits(ids)
    top5 = np.argsort(-want, 1)[:, :5]
    err = np.abs(np.take_along_axis(got, top5, 1) - np.take_along_axis(want, top5, 1)).max()
    assert err < 1.0
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
