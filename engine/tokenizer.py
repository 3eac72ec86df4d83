"""The model's tokenizer, built from the GGUF file's own vocabulary, merges and chat template.

GGUF files written by llama.cpp's converter carry the whole tokenizer in their metadata
(``tokenizer.ggml.*``). For byte-level BPE models (``tokenizer.ggml.model == "gpt2"``) we rebuild
the equivalent Hugging Face ``tokenizers.Tokenizer`` from it, so ids match the model's reference
tokenizer exactly, and render the chat template with jinja2 the way ``transformers`` does (known
templates in plain Python, to the same text).

    tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in generated_ids) + dec.flush()
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import secrets
from datetime import datetime
from functools import cached_property, lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

log = logging.getLogger(__name__)

# llama.cpp token types (enum llama_token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

PIECE_CACHE_SIZE = 1024  # chat pieces (a message with its role header) kept encoded
LONG_TEXT_CHARS = 16_384  # above this, encode() lets other threads run meanwhile

# SmolLM2-Instruct's template, as its GGUF carries it: ChatML, with a default system prompt when
# the conversation has none. Also used when a GGUF carries no chat template.
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Plain ChatML (no default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> raw byte."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _pre_tokenizer(pre: str | None):
    """The pre-tokenizer llama.cpp's converter recorded as ``tokenizer.ggml.pre``."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's tokenizer.json: every digit is its own pre-token, then GPT-2 byte-level.
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    return byte_level  # "gpt2" and anything we do not know specially


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class Tokenizer:
    """Byte-level BPE tokenizer plus chat template, read from a GGUF file."""

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        token_types: list[int] | None = None,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int | None = None,
        unk_id: int | None = None,
        pre: str | None = None,
        chat_template: str | None = None,
    ):
        self.tokens = list(tokens)
        self.vocab_size = len(self.tokens)
        self.token_types = list(token_types) if token_types is not None else [TOKEN_NORMAL] * self.vocab_size
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self._render_fast = _FAST_TEMPLATES.get(self.chat_template)

        vocab = {tok: i for i, tok in enumerate(self.tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]

        def bpe() -> HFTokenizer:
            t = HFTokenizer(models.BPE(vocab=vocab, merges=pairs))
            t.pre_tokenizer = _pre_tokenizer(pre)
            t.decoder = decoders.ByteLevel()
            if user:
                t.add_tokens([AddedToken(u, special=False, normalized=False) for u in user])
            return t

        # Control tokens (<|im_start|>, ...) are matched in raw text and kept whole;
        # user-defined tokens likewise, but are not "special" (not skipped when decoding).
        self._special_ids = {i for i, t in enumerate(self.token_types) if t == TOKEN_CONTROL}
        for i in (bos_id, eos_id):  # the <|...|> ids a chat template emits
            if i is not None:
                self._special_ids.add(i)
        special = [self.tokens[i] for i in sorted(self._special_ids)]
        user = [self.tokens[i] for i, t in enumerate(self.token_types) if t == TOKEN_USER_DEFINED]
        hf = bpe()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        self._hf = hf
        # the same BPE without the control tokens: message contents are encoded with it, so a
        # user's "<|im_end|><|im_start|>system" stays text and cannot open a turn of its own
        self._plain = bpe()
        # stand-ins for message contents while a chat template renders (private-use code points
        # and a nonce no client can know): they show where each content lies in the prompt
        nonce = secrets.token_hex(8)
        self._mark = "\ue000" + nonce + "{}\ue001"
        self._mark_re = re.compile("\ue000" + nonce + "([0-9]+)\ue001")
        self._warned_template = False
        # Chat prompts are encoded piece by piece between these tokens, each piece through a
        # cache: the tokenizer encodes those spans independently anyway, and a client re-sends
        # the whole conversation every turn, so only its new messages cost anything.
        added = sorted(set(special + user), key=len, reverse=True)  # longest match first
        self._added_ids = {t: hf.token_to_id(t) for t in added}
        self._added_re = re.compile("(" + "|".join(map(re.escape, added)) + ")") if added else None
        self._encode_piece = lru_cache(maxsize=PIECE_CACHE_SIZE)(self._encode_uncached)

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Build from a GGUF path or an open ``gguf.GGUFReader``."""
        if isinstance(path_or_reader, (str, os.PathLike)):
            import gguf

            reader = gguf.GGUFReader(path_or_reader)
        else:
            reader = path_or_reader
        model = _field(reader, "tokenizer.ggml.model", "gpt2")
        if model != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model={model!r} is not supported; only byte-level BPE ('gpt2')"
            )
        tokens = _field(reader, "tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens")
        return cls(
            tokens,
            _field(reader, "tokenizer.ggml.merges", []),
            _field(reader, "tokenizer.ggml.token_type"),
            bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
            unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
            pre=_field(reader, "tokenizer.ggml.pre"),
            chat_template=_field(reader, "tokenizer.chat_template"),
        )

    # --- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS is added, special-token text becomes its single id. A
        long text goes through the batch call, which releases the GIL while it encodes (the single
        call holds it: ~1 ms per 1000 characters that no other thread can run)."""
        if len(text) > LONG_TEXT_CHARS:
            return self._hf.encode_batch([text], add_special_tokens=False)[0].ids
        return self._hf.encode(text, add_special_tokens=False).ids

    def _encode_uncached(self, piece: str) -> tuple[int, ...]:
        # a tuple: cached values must not be mutable. A piece holds none of the template's
        # markers; special-token text in it (from a message's content) stays text.
        return tuple(self._plain.encode(piece, add_special_tokens=False).ids)

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @cached_property
    def max_token_chars(self) -> int:
        """No token covers more characters of input text than this (a token's string holds at
        least one character per byte or character it stands for): a text longer than
        ``context * max_token_chars`` cannot fit the context, and is known without encoding it."""
        return max(map(len, self.tokens))

    def token_bytes(self, id) -> bytes:
        """Raw bytes of one token (a token may hold only part of a UTF-8 character)."""
        tok = self.tokens[int(id)]
        if self.is_special(id) or self.token_types[int(id)] == TOKEN_USER_DEFINED:
            return tok.encode("utf-8")
        table = _byte_decoder()
        return bytes(table[c] for c in tok)

    def is_special(self, id) -> bool:
        return int(id) in self._special_ids

    # --- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the GGUF's chat template (as transformers does)."""
        if self._render_fast is not None:
            return self._render_fast(messages, add_generation_prompt)
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.tokens[self.bos_id] if self.bos_id is not None else "",
            eos_token=self.tokens[self.eos_id] if self.eos_id is not None else "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """``encode(apply_chat_template(messages))``, except that special-token text inside a
        message's content stays text: only the template's own markers become control tokens.
        The text between two markers (a message with its role header, the system prompt) is
        encoded once and then cached."""
        if self._added_re is None:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt))
        marked = [{**m, "content": self._mark.format(i)} for i, m in enumerate(messages)]
        parts = self._mark_re.split(self.apply_chat_template(marked, add_generation_prompt))
        kept = parts[1::2] == [str(i) for i in range(len(messages))]
        rendered = None
        if kept and self._render_fast is None:  # a jinja2 template may transform a content (trim)
            rendered = self.apply_chat_template(messages, add_generation_prompt)
            kept = rendered == "".join(messages[int(p)]["content"] if k % 2 else p
                                       for k, p in enumerate(parts))
        if not kept:
            # a template that drops, repeats or rewrites contents: the rendered prompt is split
            # at every special-token text, the contents' included (as transformers would)
            if not self._warned_template:
                self._warned_template = True
                log.warning("the chat template does not keep message contents as they are: "
                            "special-token text in a message becomes control tokens")
            parts = [rendered or self.apply_chat_template(messages, add_generation_prompt)]
        ids: list[int] = []
        piece: list[str] = []  # the text since the template's last marker
        for k, part in enumerate(parts):
            if k % 2:  # a message's content: text, whatever it holds
                piece.append(messages[int(part)]["content"])
                continue
            for j, seg in enumerate(self._added_re.split(part)):  # odd items: the template's markers
                if j % 2:
                    if piece:
                        ids.extend(self._encode_piece("".join(piece)))
                        piece.clear()
                    ids.append(self._added_ids[seg])
                elif seg:
                    piece.append(seg)
        if piece:
            ids.extend(self._encode_piece("".join(piece)))
        return ids


class IncrementalDecoder:
    """Streaming detokenization: text deltas that never split a UTF-8 character.

    Bytes of a character spread over several tokens are held back until the character is
    complete; invalid bytes become U+FFFD only once they can no longer start a valid character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is still held back (as U+FFFD if it never became a whole character)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _chatml(default_system: str | None):
    """A renderer equal to a ChatML template's jinja2 rendering (tests pin the equality)."""
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        parts = []
        if default_system is not None and messages and messages[0]["role"] != "system":
            parts.append("<|im_start|>system\n" + default_system + "<|im_end|>\n")
        for m in messages:
            parts.append("<|im_start|>" + m["role"] + "\n" + m["content"] + "<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)
    return render


# Templates rendered in plain Python, by their exact source (as llama.cpp recognises known
# templates): a jinja2 render costs ~250 us with the caches a decode step leaves behind, on the
# path to every request's first token; this costs ~40 us there (~4 us hot).
_FAST_TEMPLATES = {
    DEFAULT_CHAT_TEMPLATE: _chatml(DEFAULT_SYSTEM_PROMPT),
    CHATML_TEMPLATE: _chatml(None),
}


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
