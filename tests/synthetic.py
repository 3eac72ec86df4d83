"""Tiny synthetic Llama GGUF files, written with gguf's own writer.

The files look exactly like llama.cpp's conversions of a real Llama model (same metadata keys,
tensor names, shape convention and quantized block formats) but are a few hundred kilobytes, so
loading, kernel and server tests run without the real model or a network. Weights are random
with a fixed seed, scaled so activations stay O(1) and logits are spread but not degenerate.

A small real byte-level BPE tokenizer (256 byte tokens, merges learned from a fixed English
text, ChatML control tokens and chat template) is written too, so ``Tokenizer.from_gguf`` works
on these files and a server can be driven with text.

Shape convention (same as the real model): a weight that is ``(out, in)`` in PyTorch has GGUF
dims ``[in, out]``; ``GGUFReader`` gives ``tensor.shape == [in, out]`` and ``tensor.data`` as a
numpy array of shape ``(out, in)`` for F32/F16, or ``(out, in // 32 * block_bytes)`` uint8 for
quantized types (one row of blocks per output row).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType, LlamaFileType, TokenType
from tokenizers import pre_tokenizers

WEIGHT_TYPES = ("Q4_0", "Q4_1", "Q8_0", "F16", "F32")

FILE_TYPES = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
}

# Same ids as SmolLM2: <|endoftext|>=0, <|im_start|>=1 (BOS), <|im_end|>=2 (EOS).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the tokenizer's merges are learned from (any fixed text would do).
MERGE_CORPUS = (
    "The capital of France is Paris. The capital of Italy is Rome. "
    "What is the capital of Germany? The capital of Germany is Berlin. "
    "Hello world! Hello there, how are you? I am fine, thank you. "
    "There is the theory of the thing, and then there is the thing in the world. "
    "A wafer is a thin slice of silicon on which the chips are made. "
    "Tokens stream from the server to the client as they are decoded. "
)


def byte_level_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def learn_merges(n_merges: int, text: str = MERGE_CORPUS) -> list[tuple[str, str]]:
    """A minimal BPE trainer: repeatedly merge the most frequent adjacent pair."""
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    words = Counter(word for word, _ in pre.pre_tokenize_str(text))
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for word, count in words.items():
            parts = splits[word]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties by spelling
        merges.append(best)
        for word in words:
            parts, merged = splits[word], []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[word] = merged
    return merges


def tiny_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): specials, the 256 bytes, merged tokens, then padding."""
    n_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_fixed:
        raise ValueError(f"vocab_size={vocab_size} must be at least {n_fixed}")
    tokens = [*SPECIAL_TOKENS, *byte_level_symbols()]
    types = [TokenType.CONTROL] * len(SPECIAL_TOKENS) + [TokenType.NORMAL] * 256
    merges = learn_merges(vocab_size - n_fixed)
    for a, b in merges:
        tokens.append(a + b)
        types.append(TokenType.NORMAL)
    while len(tokens) < vocab_size:  # the corpus ran out of pairs: unused filler tokens
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(TokenType.UNUSED)
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges]


def _encode_weight(w: np.ndarray, type_name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """F32/F16 as arrays; Q4_0/Q4_1/Q8_0 as uint8 rows of blocks, by gguf's reference quantizer."""
    qtype = GGMLQuantizationType[type_name]
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_tiny_llama(
    path,
    *,
    weight_type: str = "Q4_1",
    embed_type: str | None = None,
    tied: bool = True,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_ffn: int = 128,
    vocab_size: int = 320,
    context_length: int = 256,
    rope_base: float = 10000.0,
    rms_eps: float = 1e-5,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama GGUF file and return its path.

    ``weight_type`` is the format of every 2-D weight (Q4_0, Q4_1, Q8_0, F16, F32);
    ``embed_type`` that of token_embd.weight (default: ``weight_type``; the real SmolLM2 file
    has Q8_0 embeddings with Q4_1 elsewhere). Norm weights are always F32. With ``tied`` there
    is no output.weight and the head reuses the token embeddings, as in SmolLM2.
    """
    embed_type = embed_type or weight_type
    for name, t in (("weight_type", weight_type), ("embed_type", embed_type)):
        if t not in WEIGHT_TYPES:
            raise ValueError(f"{name}={t!r}; expected one of {WEIGHT_TYPES}")
    if d_model % n_heads or n_heads % n_kv_heads:
        raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")
    head_dim = d_model // n_heads
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    for name, dim in (("d_model", d_model), ("d_ffn", d_ffn)):
        if dim % 32:
            raise ValueError(f"{name}={dim} must be a multiple of 32 (quantization block size)")

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = tiny_vocab(vocab_size)

    def linear(n_out: int, n_in: int) -> np.ndarray:  # torch layout (out, in)
        return rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d_model)).astype(np.float32)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama-synthetic")
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab_size)
    w.add_file_type(FILE_TYPES[weight_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)
    w.add_pad_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHATML_TEMPLATE)

    def add(name: str, array: np.ndarray, type_name: str) -> None:
        data, qtype = _encode_weight(array, type_name)
        w.add_tensor(name, data, raw_dtype=qtype)

    # Embedding rows of std 0.25: tied logits then have std ~0.25 * sqrt(d_model) = 2.
    add("token_embd.weight", 0.25 * rng.standard_normal((vocab_size, d_model)), embed_type)
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm(), "F32")
        add(p + "attn_q.weight", linear(d_model, d_model), weight_type)
        add(p + "attn_k.weight", linear(n_kv_heads * head_dim, d_model), weight_type)
        add(p + "attn_v.weight", linear(n_kv_heads * head_dim, d_model), weight_type)
        add(p + "attn_output.weight", linear(d_model, d_model), weight_type)
        add(p + "ffn_norm.weight", norm(), "F32")
        add(p + "ffn_gate.weight", linear(d_ffn, d_model), weight_type)
        add(p + "ffn_up.weight", linear(d_ffn, d_model), weight_type)
        add(p + "ffn_down.weight", linear(d_model, d_ffn), weight_type)
    add("output_norm.weight", norm(), "F32")
    if not tied:
        add("output.weight", 2.0 * linear(vocab_size, d_model), weight_type)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
