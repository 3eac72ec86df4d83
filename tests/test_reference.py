"""The float64 reference forward: right answer on the real model, sane on every synthetic format.

Also pins down the GGUF tensor conventions the engine relies on (shapes and block byte layout).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine.tokenizer import Tokenizer
from reference import ReferenceModel, dequantize, reference_logits, rope
from synthetic import WEIGHT_TYPES

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


# --- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_reference(real_model_path):
    return ReferenceModel(real_model_path)


@pytest.mark.real_model
def test_real_model_answers_paris(real_reference, real_tokenizer, record_property):
    prompt = real_tokenizer.encode_chat(FRANCE)
    ids, step_logits = real_reference.greedy(prompt, max_new_tokens=12, stop_ids=(real_tokenizer.eos_id,))
    assert real_tokenizer.decode(ids, skip_special=True) == "The capital of France is Paris."
    assert ids[-1] == real_tokenizer.eos_id

    # The first token is a near-tie: "The" barely beats "L" (~0.08 logits in float64).
    first = step_logits[0]
    best, runner_up = np.argsort(first)[::-1][:2]
    margin = float(first[best] - first[runner_up])
    record_property("first_token_margin", margin)
    print(f"first token {real_tokenizer.tokens[best]!r} leads {real_tokenizer.tokens[runner_up]!r} by {margin:.4f}")
    assert real_tokenizer.tokens[best] == "The"
    assert 0 < margin < 0.5


@pytest.mark.real_model
def test_real_model_shape_conventions(real_model_path):
    """What GGUFReader hands the engine for the real file (documented in tests/reference.py)."""
    reader = gguf.GGUFReader(real_model_path)
    t = {x.name: x for x in reader.tensors}
    k = t["blk.0.attn_k.weight"]  # torch (192, 576): 3 kv heads x 64 by d_model
    assert k.tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert [int(d) for d in k.shape] == [576, 192]  # GGUF dims: [in, out]
    assert k.data.shape == (192, 576 // 32 * 20) and k.data.dtype == np.uint8  # rows of blocks
    embd = t["token_embd.weight"]
    assert embd.tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert embd.data.shape == (49152, 576 // 32 * 34)
    norm = t["blk.0.attn_norm.weight"]
    assert norm.data.shape == (576,) and norm.data.dtype == np.float32
    assert "output.weight" not in t  # tied head
    assert dequantize(k).shape == (192, 576)
    _check_block_layout(k)
    _check_block_layout(embd, rows=4)


# --- the byte layout of quantized blocks -----------------------------------------------------


def _manual_dequantize(row: np.ndarray, qtype) -> np.ndarray:
    """One row of blocks decoded by hand, per ggml's block structs (little-endian)."""
    Q = gguf.GGMLQuantizationType
    block_bytes = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}[qtype]
    out = []
    for b in row.reshape(-1, block_bytes):
        d = b[0:2].view(np.float16)[0].astype(np.float64)
        if qtype == Q.Q8_0:  # d, then int8 qs[32]: x = q * d
            out.append(b[2:34].view(np.int8) * d)
            continue
        if qtype == Q.Q4_0:  # d, then qs[16]: x[j] = (lo nibble - 8) * d, x[j+16] = (hi - 8) * d
            qs, m, offset = b[2:18], 0.0, 8
        else:  # Q4_1: d, m, then qs[16]: x[j] = lo * d + m, x[j+16] = hi * d + m
            qs, m, offset = b[4:20], b[2:4].view(np.float16)[0].astype(np.float64), 0
        nibbles = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float64) - offset
        out.append(nibbles * d + m)
    return np.concatenate(out)


def _check_block_layout(tensor, rows: int = 8) -> None:
    expected = dequantize(tensor)
    for r in range(rows):
        np.testing.assert_allclose(_manual_dequantize(tensor.data[r], tensor.tensor_type), expected[r], rtol=1e-6)


@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_synthetic_block_layout(tiny_gguf, weight_type):
    reader = gguf.GGUFReader(tiny_gguf(weight_type))
    t = {x.name: x for x in reader.tensors}
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        _check_block_layout(t[name])


# --- synthetic models ------------------------------------------------------------------------

TOKENS = [1, 120, 118, 267, 13, 273, 280, 270, 35, 317, 265]


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_logits_are_finite_and_spread(tiny_gguf, weight_type, tied):
    logits = reference_logits(tiny_gguf(weight_type, tied=tied), TOKENS)
    assert logits.shape == (len(TOKENS), 320) and logits.dtype == np.float64
    assert np.all(np.isfinite(logits))
    spread = logits.std(axis=-1)
    assert np.all(spread > 0.3) and np.all(spread < 20), spread
    assert len(set(np.argmax(logits, axis=-1))) > 1  # not one token whatever the input


def test_synthetic_tiny_files_match_their_description(tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf("Q4_1", tied=False))
    t = {x.name: x for x in reader.tensors}
    assert [int(d) for d in t["blk.0.attn_k.weight"].shape] == [64, 32]  # [in=d_model, out=2 kv heads x 16]
    assert [int(d) for d in t["blk.0.ffn_down.weight"].shape] == [128, 64]
    assert [int(d) for d in t["output.weight"].shape] == [64, 320]
    assert t["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1
    assert reader.fields["llama.rope.dimension_count"].contents() == 16
    assert Tokenizer.from_gguf(reader).eos_id == 2


def test_formats_agree_with_f32(tiny_gguf):
    """Same random draws in every format; RMS logit error relative to the logits' spread
    (measured: F16 0.0008, Q8_0 0.018, Q4_1 0.25, Q4_0 0.29)."""
    ref = reference_logits(tiny_gguf("F32"), TOKENS)
    for weight_type, tolerance in [("F16", 0.005), ("Q8_0", 0.04), ("Q4_1", 0.4), ("Q4_0", 0.4)]:
        logits = reference_logits(tiny_gguf(weight_type), TOKENS)
        err = np.sqrt(np.mean((logits - ref) ** 2)) / ref.std()
        assert err < tolerance, (weight_type, err)
        assert np.corrcoef(logits.ravel(), ref.ravel())[0, 1] > 0.9


def test_mixed_embedding_type(tiny_gguf):
    logits = reference_logits(tiny_gguf("Q4_1", embed_type="Q8_0"), TOKENS)
    assert np.all(np.isfinite(logits))


def test_kv_cached_steps_equal_full_recompute(tiny_gguf):
    model = ReferenceModel(tiny_gguf("Q4_1"))
    full = model.forward(TOKENS)
    cache = model.new_cache()
    parts = [model.forward(TOKENS[:4], cache)] + [model.forward([t], cache) for t in TOKENS[4:]]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-10)


def test_causal_later_tokens_do_not_change_earlier_logits(tiny_gguf):
    model = ReferenceModel(tiny_gguf("Q8_0"))
    a = model.forward(TOKENS)
    b = model.forward(TOKENS[:5] + [3, 4, 5])
    np.testing.assert_allclose(a[:5], b[:5], rtol=0, atol=1e-12)
    assert not np.allclose(a[5], b[5])


def test_grouped_query_attention_variants(tiny_gguf):
    for n_kv_heads in (1, 4):  # multi-query and plain multi-head
        logits = reference_logits(tiny_gguf("F32", n_kv_heads=n_kv_heads), TOKENS)
        assert np.all(np.isfinite(logits))


def test_rope_rotates_adjacent_pairs():
    x = np.random.default_rng(0).standard_normal((3, 2, 8))
    positions = np.array([0.0, 1.0, 5.0])
    y = rope(x, positions, n_rot=8, base=10000.0)
    np.testing.assert_allclose(y[0], x[0])  # position 0: identity
    pair_norm = lambda v: np.hypot(v[..., 0::2], v[..., 1::2])
    np.testing.assert_allclose(pair_norm(y), pair_norm(x))
    # first pair at position 1 turns by exactly 1 radian
    angle = np.arctan2(y[1, 0, 1], y[1, 0, 0]) - np.arctan2(x[1, 0, 1], x[1, 0, 0])
    assert np.isclose(np.mod(angle, 2 * np.pi), 1.0)
    # partial rotary: dims past n_rot are untouched
    np.testing.assert_array_equal(rope(x, positions, n_rot=4, base=10000.0)[..., 4:], x[..., 4:])
