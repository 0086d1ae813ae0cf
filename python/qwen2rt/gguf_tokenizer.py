"""A :class:`~qwen2rt.tokenizer.Tokenizer` built from the tokenizer metadata of a GGUF file.

A GGUF file carries no tokenizer.json: llama.cpp's converter stores the vocabulary, the BPE merges, a type per token,
the special token ids and the chat template as metadata under ``tokenizer.*`` keys. :func:`tokenizer_from_gguf` turns
those back into a ``tokenizers.Tokenizer`` and wraps it in a :class:`Tokenizer`.

Supported: GPT-2 style byte-level BPE (``tokenizer.ggml.model == "gpt2"``) with Qwen2's pre-tokenizer
(``tokenizer.ggml.pre == "qwen2"``). The pipeline is the one in Qwen2's tokenizer.json: NFC normalizer, the Qwen2 split
regex, ByteLevel without its own regex, ByteLevel decoder.

The result follows what transformers builds for such a file (``AutoTokenizer.from_pretrained(folder, gguf_file=...)``),
so the ids are the same, with one deliberate difference: transformers' GGUF path leaves out Qwen2's NFC normalizer,
while this module keeps it, so that a GGUF and the Hugging Face folder it was converted from encode text identically.
The two differ only on text that is not in NFC form (e.g. "e" followed by a combining acute accent).

What is taken from the token types (llama.cpp's numbering):

* 3, control (``<|im_start|>``, ``<|endoftext|>``, ``<|fim_middle|>``...): added tokens, special, so they are matched
  whole in text and left out by ``decode(..., skip_special_tokens=True)``;
* 4, user-defined (``<tool_call>``...): added tokens, not special (matched whole, kept by decode);
* the others (normal, unknown, unused, byte, undefined): ordinary vocabulary entries.

A control token written with characters outside the byte-level alphabet (a mislabel of llama.cpp's; real byte-level
tokens never are) is left as an ordinary entry, as transformers does.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Mapping
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from qwen2rt.errors import FormatError, UnsupportedModelError
from qwen2rt.tokenizer import Tokenizer

__all__ = ["tokenizer_from_gguf", "SUPPORTED_TOKENIZER_MODELS", "SUPPORTED_PRE_TOKENIZERS"]

# tokenizer.ggml.model values this module builds
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)

# Qwen2's split regex (its tokenizer.json, and llama.cpp's "qwen2" pre-tokenizer)
_QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre value -> split regex
_PRE_TOKENIZER_SPLITS = {"qwen2": _QWEN2_SPLIT_REGEX}
SUPPORTED_PRE_TOKENIZERS = tuple(_PRE_TOKENIZER_SPLITS)

# llama.cpp token types
TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6
_MAX_TOKEN_TYPE = TOKEN_TYPE_BYTE

# Special token names (as Tokenizer knows them) -> the metadata key of their id
_SPECIAL_TOKEN_ID_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}

_KEY_MODEL = "tokenizer.ggml.model"
_KEY_PRE = "tokenizer.ggml.pre"
_KEY_TOKENS = "tokenizer.ggml.tokens"
_KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
_KEY_MERGES = "tokenizer.ggml.merges"
_KEY_ADD_BOS = "tokenizer.ggml.add_bos_token"
_KEY_ADD_EOS = "tokenizer.ggml.add_eos_token"
_KEY_CHAT_TEMPLATE = "tokenizer.chat_template"


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes are moved
    to U+0100 onwards in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _byte_alphabet()
_BYTE_CHARS = frozenset(_BYTE_TO_CHAR.values())
# Finds a character that is not in the byte-level alphabet
_OUTSIDE_ALPHABET = re.compile("[^" + "".join(re.escape(c) for c in sorted(_BYTE_CHARS)) + "]")


def _in_alphabet(token: str) -> bool:
    return _OUTSIDE_ALPHABET.search(token) is None


def _byte_spelling(token: str) -> str:
    """A token written in plain text, spelled in the byte-level alphabet (one character per UTF-8 byte)."""
    return "".join(_BYTE_TO_CHAR[b] for b in token.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------------------------------------------------
# Metadata access with checks
# --------------------------------------------------------------------------------------------------------------------


class _Metadata:
    def __init__(self, metadata: Mapping[str, Any], source: str):
        self.values = metadata
        self.where = source or "GGUF metadata"

    def error(self, key: str, message: str) -> FormatError:
        return FormatError(f"{self.where}: {key} {message}")

    def get_str(self, key: str, *, required: bool) -> str | None:
        value = self.values.get(key)
        if value is None:
            if required:
                raise self.error(key, "is missing (the file has no tokenizer of this kind, or a truncated header)")
            return None
        if not isinstance(value, str):
            raise self.error(key, f"should be a string, got {_describe(value)}")
        return value

    def get_bool(self, key: str) -> bool | None:
        value = self.values.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self.error(key, f"should be true or false, got {_describe(value)}")
        return value

    def get_list(self, key: str) -> list:
        value = self.values.get(key)
        if value is None:
            raise self.error(key, "is missing")
        if not isinstance(value, (list, tuple)):
            raise self.error(key, f"should be an array, got {_describe(value)}")
        return list(value)

    def get_str_list(self, key: str) -> list[str]:
        value = self.get_list(key)
        if not all(type(item) is str for item in value):
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise self.error(key, f"should be an array of strings, but item {index} is {_describe(item)}")
        return value

    def get_int_list(self, key: str) -> list[int]:
        value = self.get_list(key)
        if all(type(item) is int for item in value):
            return value
        out = []
        for index, item in enumerate(value):
            if isinstance(item, bool):
                raise self.error(key, f"should be an array of integers, but item {index} is {_describe(item)}")
            try:
                out.append(operator.index(item))
            except TypeError:
                raise self.error(
                    key, f"should be an array of integers, but item {index} is {_describe(item)}"
                ) from None
        return out

    def get_token_id(self, key: str, n_tokens: int) -> int | None:
        value = self.values.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            raise self.error(key, f"should be a token id, got {_describe(value)}")
        try:
            value = operator.index(value)
        except TypeError:
            raise self.error(key, f"should be a token id, got {_describe(value)}") from None
        if not 0 <= value < n_tokens:
            raise self.error(key, f"is {value}, outside the vocabulary of {n_tokens} tokens ({_KEY_TOKENS})")
        return value


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


# --------------------------------------------------------------------------------------------------------------------
# Building the tokenizer
# --------------------------------------------------------------------------------------------------------------------


def _check_merges(meta: _Metadata, merges: list[str]) -> None:
    """Each merge must be two non-empty tokens separated by one space."""
    if all(m.count(" ") == 1 and m[0] != " " and m[-1] != " " for m in merges):
        return
    for index, merge in enumerate(merges):
        if merge.count(" ") != 1 or merge[0] == " " or merge[-1] == " ":
            raise meta.error(_KEY_MERGES, f"item {index} should be two tokens separated by one space, got {merge!r}")


def _find_bad_merge(meta: _Metadata, merges: list[str], vocab: dict[str, int]) -> FormatError | None:
    for index, merge in enumerate(merges):
        left, right = merge.split(" ")
        for part in (left, right, left + right):
            if part not in vocab:
                return meta.error(
                    _KEY_MERGES,
                    f"item {index} ({merge!r}) needs the token {part!r}, which is not in {_KEY_TOKENS}",
                )
    return None


def _build_backend(
    meta: _Metadata,
    tokens: list[str],
    token_types: list[int],
    merges: list[str],
    split_regex: str,
) -> tokenizers.Tokenizer:
    # Tokens written in plain text (outside the byte-level alphabet) are respelled byte by byte, as transformers does;
    # llama.cpp's converter writes a byte-level vocabulary already spelled, so this is usually a no-op.
    if _in_alphabet("".join(tokens)):
        spelled = tokens
    else:
        spelled = [token if _in_alphabet(token) else _byte_spelling(token) for token in tokens]
    vocab = dict(zip(spelled, range(len(spelled))))  # a repeated token keeps its last id

    pairs = [tuple(merge.split(" ")) for merge in merges]
    try:
        model = models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - tokenizers raises a plain Exception, or panics (pyo3's
        # PanicException, a BaseException) when a merge's result is not in the vocabulary
        raise _find_bad_merge(meta, merges, vocab) or meta.error(
            _KEY_MERGES, f"can't be used with {_KEY_TOKENS}: {e}"
        ) from e

    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)

    # Control tokens become special added tokens, user-defined ones plain added tokens; both are matched whole in
    # text. They are in the vocabulary already, so they keep their ids.
    control = []
    user_defined = []
    for index in _indices_of_types(token_types):
        token = tokens[index]
        kind = token_types[index]
        if kind == TOKEN_TYPE_CONTROL and _in_alphabet(token):
            control.append(token)
        elif kind == TOKEN_TYPE_USER_DEFINED and token in vocab:
            user_defined.append(token)
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user_defined:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user_defined])
    return backend


def _indices_of_types(token_types: list[int]) -> list[int]:
    """Indices of tokens of type control or user-defined."""
    wanted = (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    return [index for index, kind in enumerate(token_types) if kind in wanted]


def _bos_eos_processor(bos: tuple[int, str] | None, eos: tuple[int, str] | None) -> processors.TemplateProcessing:
    """A post-processor putting BOS before and/or EOS after each sequence (what transformers sets up for
    add_bos_token/add_eos_token). The template names them by placeholders, so any token spelling works."""
    specials = []
    single = ["$A:0"]
    pair = ["$B:1"]
    if bos is not None:
        specials.append({"id": "[BOS]", "ids": [bos[0]], "tokens": [bos[1]]})
        single.insert(0, "[BOS]:0")
        pair.insert(0, "[BOS]:1")
    if eos is not None:
        specials.append({"id": "[EOS]", "ids": [eos[0]], "tokens": [eos[1]]})
        single.append("[EOS]:0")
        pair.append("[EOS]:1")
    return processors.TemplateProcessing(single=single, pair=single + pair, special_tokens=specials)


def tokenizer_from_gguf(metadata: Mapping[str, Any], source: str = "") -> Tokenizer:
    """Build the :class:`Tokenizer` that a GGUF file's metadata describes.

    ``metadata`` maps GGUF keys to plain Python values (strings, ints, floats, bools and lists of them), e.g.
    ``metadata["tokenizer.ggml.tokens"]`` is a list of strings. ``source`` (the file's path) is used in error messages
    and names the tokenizer.

    Raises UnsupportedModelError for a tokenizer other than byte-level BPE with the Qwen2 pre-tokenizer, and
    FormatError for missing or malformed tokenizer keys.
    """
    if not isinstance(metadata, Mapping):
        raise FormatError(f"{source or 'GGUF metadata'}: metadata should be a dict, got {type(metadata).__name__}")
    source = os.fspath(source) if source else ""
    meta = _Metadata(metadata, source)

    tokenizer_model = meta.get_str(_KEY_MODEL, required=True)
    if tokenizer_model not in SUPPORTED_TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"{meta.where}: {_KEY_MODEL} is {tokenizer_model!r}; qwen2rt only reads byte-level BPE tokenizers "
            f"({', '.join(repr(m) for m in SUPPORTED_TOKENIZER_MODELS)})"
        )
    pre = meta.get_str(_KEY_PRE, required=False)
    if pre is None:
        raise UnsupportedModelError(
            f"{meta.where}: {_KEY_PRE} is missing, so the pre-tokenizer is unknown; qwen2rt supports "
            f"{', '.join(repr(p) for p in SUPPORTED_PRE_TOKENIZERS)}"
        )
    if pre not in _PRE_TOKENIZER_SPLITS:
        raise UnsupportedModelError(
            f"{meta.where}: {_KEY_PRE} is {pre!r}; qwen2rt supports the pre-tokenizers "
            f"{', '.join(repr(p) for p in SUPPORTED_PRE_TOKENIZERS)}"
        )

    tokens = meta.get_str_list(_KEY_TOKENS)
    if not tokens:
        raise meta.error(_KEY_TOKENS, "is empty")
    n_tokens = len(tokens)
    token_types = meta.get_int_list(_KEY_TOKEN_TYPE)
    if len(token_types) != n_tokens:
        raise meta.error(
            _KEY_TOKEN_TYPE, f"has {len(token_types)} entries but {_KEY_TOKENS} has {n_tokens}; they should match"
        )
    if token_types and not 0 <= min(token_types) <= max(token_types) <= _MAX_TOKEN_TYPE:
        index, bad = next((i, t) for i, t in enumerate(token_types) if not 0 <= t <= _MAX_TOKEN_TYPE)
        raise meta.error(_KEY_TOKEN_TYPE, f"item {index} is {bad}, not a llama.cpp token type (0 to {_MAX_TOKEN_TYPE})")
    merges = meta.get_str_list(_KEY_MERGES)
    _check_merges(meta, merges)

    ids = {name: meta.get_token_id(key, n_tokens) for name, key in _SPECIAL_TOKEN_ID_KEYS.items()}
    add_bos = bool(meta.get_bool(_KEY_ADD_BOS))
    add_eos = bool(meta.get_bool(_KEY_ADD_EOS))
    chat_template = meta.get_str(_KEY_CHAT_TEMPLATE, required=False)

    backend = _build_backend(meta, tokens, token_types, merges, _PRE_TOKENIZER_SPLITS[pre])

    # The special tokens, spelled as the file spells them (what chat templates get as bos_token etc.)
    special_tokens = {name: (tokens[i] if i is not None else None) for name, i in ids.items()}

    # BOS/EOS added by encode(add_special_tokens=True), as transformers' post-processor adds them
    bos_id, eos_id = ids["bos_token"], ids["eos_token"]
    add_bos = add_bos and bos_id is not None
    add_eos = add_eos and eos_id is not None
    if add_bos or add_eos:
        backend.post_processor = _bos_eos_processor(
            (bos_id, special_tokens["bos_token"]) if add_bos else None,
            (eos_id, special_tokens["eos_token"]) if add_eos else None,
        )

    name = os.path.basename(source) if source else ""
    if not name:
        general_name = metadata.get("general.name")
        name = general_name if isinstance(general_name, str) else ""

    tokenizer = Tokenizer(
        backend,
        chat_template=chat_template,
        special_tokens=special_tokens,
        add_bos_token=add_bos,
        name=name,
    )
    # The ids the file states, even where a token's spelling is repeated in the vocabulary or was respelled
    tokenizer.bos_token_id = bos_id
    tokenizer.eos_token_id = eos_id
    tokenizer.pad_token_id = ids["pad_token"]
    tokenizer.unk_token_id = ids["unk_token"]
    tokenizer._template_origin = f"{meta.where} ({_KEY_CHAT_TEMPLATE})"
    tokenizer._missing_template_hint = f"the GGUF metadata has no {_KEY_CHAT_TEMPLATE}"
    return tokenizer
