"""Text <-> token ids, and chat templates, for Qwen2-style Hugging Face tokenizer folders.

The ids come from the `tokenizers` library running the folder's tokenizer.json, so they are the ids that
transformers' fast tokenizer produces. Chat templates are rendered with a sandboxed jinja2 environment set up the way
transformers 5.x sets it up (same filters, globals, extensions and input clean-up), so that a rendered chat is
byte-identical to ``transformers_tokenizer.apply_chat_template(messages, tokenize=False)``.

Control tokens (special tokens such as ``<|im_start|>``) that appear inside user-supplied strings are, by default,
encoded by :meth:`Tokenizer.encode_chat` as plain text rather than as the control token, so a user cannot forge a turn
boundary; this is what transformers does with ``apply_chat_template(..., sanitize_control_tokens=True)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils
import numpy as np
import tokenizers

from qwen2rt.errors import FormatError, InvalidInputError, ModelNotFoundError, Qwen2rtError

__all__ = ["Tokenizer"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# The named special tokens transformers passes to chat templates (in this order), when they are set
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Special-token defaults of tokenizer classes, used for the keys their tokenizer_config.json leaves out
_CLASS_DEFAULT_TOKENS = {
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
_CLASS_DEFAULT_TOKENS["Qwen2TokenizerFast"] = _CLASS_DEFAULT_TOKENS["Qwen2Tokenizer"]

# Private-use code points wrapped around control tokens found in user-supplied strings (same as transformers uses)
_MARK_START = "\U000f0000"
_MARK_END = "\U000f0001"

# The names a message's reasoning may come under; templates read the first one
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# Appended to the final message when continuing it, to find where the message ends in the rendered chat
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "

# Where a template passed as the chat_template argument comes from, for messages
_ARGUMENT_ORIGIN = "chat_template argument"

# Names that render() sets itself, so callers can't also pass them as template variables
_RESERVED_TEMPLATE_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


# --------------------------------------------------------------------------------------------------------------------
# Template environment
# --------------------------------------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant output in training templates; here it only renders
    its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja2's own tojson, no HTML escaping, and the json.dumps layout options are exposed
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _SafeDict:
    """The ``dict`` global: builds dicts, and offers ``dict.fromkeys``, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_key(key):
    if isinstance(key, str) and key.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates may not store underscore-prefixed attributes on a namespace (got {key!r})"
        )


class _SafeNamespace(jinja2.utils.Namespace):
    """The ``namespace`` global: a jinja2 Namespace that refuses underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):  # same calling convention as jinja2's Namespace (self may be a keyword)
        self, rest = args[0], args[1:]
        values = dict(*rest, **kwargs)
        for key in values:
            _check_namespace_key(key)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, key, value):
        _check_namespace_key(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)


def _jinja_version_ok() -> bool:
    parts = []
    for part in jinja2.__version__.split(".")[:3]:
        digits = re.match(r"\d+", part)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts) >= (3, 1, 6)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """Compile a chat template (cached by its text). Raises jinja2.TemplateSyntaxError for a broken template."""
    if not _jinja_version_ok():
        # Older releases have known sandbox escapes, and chat templates are untrusted code
        raise Qwen2rtError(f"chat templates need jinja2 >= 3.1.6, but jinja2 {jinja2.__version__} is installed")
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _SafeDict()
    env.globals["namespace"] = _SafeNamespace
    return env.from_string(source)


@functools.lru_cache(maxsize=32)
def _template_literals(source: str) -> str:
    """Every literal string in a template (raw text and string constants), joined by NULs so that a search can't
    match across two of them."""
    env = _compile(source).environment
    ast = env.parse(source)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(literals)


# --------------------------------------------------------------------------------------------------------------------
# Template input clean-up (mirrors what transformers does before rendering)
# --------------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Rebuild a value out of plain JSON-like Python types, so the sandbox never sees objects with unexpected
    methods. Unknown objects become an inert ``"<TypeName>"`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list) -> list:
    """Copy a message's reasoning to ``reasoning_content`` (what templates read) and ``thinking`` (gpt-oss)."""
    out = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = None
            for key in _REASONING_KEYS:
                if message.get(key) is not None:
                    reasoning = message[key]
                    break
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _mark(value: Any, control_re: re.Pattern) -> Any:
    """Wrap every control token inside user strings with the private-use markers (dict keys are left alone)."""
    if isinstance(value, str):
        # Remove markers already present, so they can't be used to forge a marked token
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return control_re.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, value)
    if isinstance(value, dict):
        return {key: _mark(item, control_re) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(item, control_re) for item in value]
    return value


def _alternation(tokens) -> str:
    """A regex alternation matching any of ``tokens``, longest first; one that never matches when there are none."""
    ordered = sorted(tokens, key=len, reverse=True)
    return "|".join(re.escape(token) for token in ordered) or "(?!)"


def _token_content(value, file: str, key: str) -> str | None:
    """A special token given in a config file as a string, an AddedToken-like dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise FormatError(f"{file}: {key} should be a string, an object with a 'content' string, or null; got {value!r}")


# --------------------------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """A Hugging Face fast tokenizer plus its chat template.

    Build one with :meth:`from_hf_folder`, or directly from a ``tokenizers.Tokenizer``.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        special_tokens: dict[str, str | None],
        add_bos_token: bool = False,
        name: str = "",
    ):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise InvalidInputError(f"tokenizer should be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if chat_template is not None and not isinstance(chat_template, str):
            raise InvalidInputError(f"chat_template should be a string or None, got {type(chat_template).__name__}")
        self._tok = tokenizer
        # Encode whole texts: transformers switches off any truncation or padding stored in tokenizer.json
        if tokenizer.truncation is not None:
            tokenizer.no_truncation()
        if tokenizer.padding is not None:
            tokenizer.no_padding()
        self.name = name
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.special_tokens: dict[str, str | None] = dict(special_tokens or {})
        for key, value in self.special_tokens.items():
            if value is not None and not isinstance(value, str):
                raise InvalidInputError(f"special token {key} should be a string or None, got {value!r}")
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

        self.bos_token_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id_of(self.special_tokens.get("eos_token"))
        self.pad_token_id = self._id_of(self.special_tokens.get("pad_token"))
        self.unk_token_id = self._id_of(self.special_tokens.get("unk_token"))

        added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}, in id order
        self._added_tokens = [(token.content, bool(token.special)) for _, token in sorted(added.items())]
        self.special_token_ids: frozenset[int] = frozenset(i for i, token in added.items() if token.special)

        # The special tokens as template variables (transformers' special_tokens_map), named ones first
        ordered = [key for key in _NAMED_SPECIAL_TOKENS if key in self.special_tokens]
        ordered += [key for key in self.special_tokens if key not in _NAMED_SPECIAL_TOKENS]
        self._template_tokens = {
            key: self.special_tokens[key] for key in ordered if self.special_tokens[key] is not None
        }

        # Set by from_hf_folder: other named templates, an explicit control-token list, and where the template is from
        self._named_templates: dict[str, str] = {}
        self._template_origins: dict[str, str] = {}
        self._control_res: dict[str, re.Pattern] = {}  # control-token regex per template text
        self._chat_control_tokens: tuple[str, ...] | None = None
        self._template_origin = f"chat template of tokenizer {name!r}" if name else "chat template"
        # Why there is no chat template, for the error message (set by the loaders)
        self._missing_template_hint = f"neither {TOKENIZER_CONFIG_FILE} nor {CHAT_TEMPLATE_FILE} provides one"
        # Splits a chat rendered from marked inputs at the markers (see _encode_marked)
        self._markers_re = re.compile(
            f"{_MARK_START}({_alternation(c for c, _ in self._added_tokens)}){_MARK_END}|[{_MARK_START}{_MARK_END}]"
        )
        self._newline_ids = self._encode_plain("\n")

    # ---------------------------------------------------------------------------------------------------- loading

    def save_pretrained(self, folder) -> None:
        """Write tokenizer.json and tokenizer_config.json (chat template, special tokens) that
        from_hf_folder reads back to an equal tokenizer."""
        folder = os.fspath(folder)
        with open(os.path.join(folder, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(_compact_tokenizer_json(self._tok.to_str()))
        config = {key: value for key, value in self.special_tokens.items()}
        config["add_bos_token"] = self.add_bos_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(folder, TOKENIZER_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)

    @classmethod
    def from_hf_folder(cls, folder) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and chat templates from a Hugging Face model folder."""
        folder = os.fspath(folder)
        if os.path.isfile(folder) and os.path.basename(folder) == TOKENIZER_FILE:
            folder = os.path.dirname(folder) or "."
        if not os.path.isdir(folder):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise ModelNotFoundError(f"tokenizer folder {folder} {what}")
        tok_path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(tok_path):
            raise ModelNotFoundError(f"{tok_path} not found: qwen2rt needs the fast tokenizer file tokenizer.json")
        tokenizer = _load_tokenizers_file(tok_path)

        cfg_path = os.path.join(folder, TOKENIZER_CONFIG_FILE)
        config = _read_json_object(cfg_path) if os.path.isfile(cfg_path) else {}

        # Special tokens: the config's, then (legacy, as transformers) special_tokens_map.json when the config has
        # no added_tokens_decoder, then the tokenizer class's defaults for the keys still missing
        special: dict[str, str | None] = {}
        for key, value in config.items():
            # The named special tokens, and other "*_token" strings (e.g. image_token), as transformers reads them
            named = key in _NAMED_SPECIAL_TOKENS
            if named or (key.endswith("_token") and (isinstance(value, str) or _is_added_token_dict(value))):
                special[key] = _token_content(value, cfg_path, key)
        extra = config.get("extra_special_tokens")
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                special[key] = _token_content(value, cfg_path, f"extra_special_tokens.{key}")
        map_path = os.path.join(folder, SPECIAL_TOKENS_MAP_FILE)
        if "added_tokens_decoder" not in config and os.path.isfile(map_path):
            for key, value in _read_json_object(map_path).items():
                if key in _NAMED_SPECIAL_TOKENS or (key.endswith("_token") and isinstance(value, (str, Mapping))):
                    special[key] = _token_content(value, map_path, key)
        tokenizer_class = config.get("tokenizer_class")
        if tokenizer_class is not None and not isinstance(tokenizer_class, str):
            raise FormatError(f"{cfg_path}: tokenizer_class should be a string, got {type(tokenizer_class).__name__}")
        for key, value in _CLASS_DEFAULT_TOKENS.get(tokenizer_class, {}).items():
            special.setdefault(key, value)

        add_bos_token = config.get("add_bos_token", False)
        if not isinstance(add_bos_token, bool):
            raise FormatError(f"{cfg_path}: add_bos_token should be true or false, got {add_bos_token!r}")

        # Chat templates: chat_template.jinja and additional_chat_templates/*.jinja take priority over the config
        templates: dict[str, str] = {}
        origins: dict[str, str] = {}
        jinja_path = os.path.join(folder, CHAT_TEMPLATE_FILE)
        if os.path.isfile(jinja_path):
            templates["default"] = _read_text(jinja_path)
            origins["default"] = jinja_path
        extra_dir = os.path.join(folder, CHAT_TEMPLATE_DIR)
        if os.path.isdir(extra_dir):
            for entry in sorted(os.listdir(extra_dir)):
                path = os.path.join(extra_dir, entry)
                if entry.endswith(".jinja") and os.path.isfile(path):
                    templates[entry[: -len(".jinja")]] = _read_text(path)
                    origins[entry[: -len(".jinja")]] = path
        if not templates and config.get("chat_template") is not None:
            value = config["chat_template"]
            if isinstance(value, str):
                templates["default"] = value
            elif isinstance(value, list):
                for item in value:
                    if not (
                        isinstance(item, Mapping)
                        and isinstance(item.get("name"), str)
                        and isinstance(item.get("template"), str)
                    ):
                        raise FormatError(
                            f"{cfg_path}: each entry of chat_template should be an object with 'name' and 'template' "
                            f"strings, got {item!r}"
                        )
                    templates[item["name"]] = item["template"]
            else:
                raise FormatError(
                    f"{cfg_path}: chat_template should be a string or a list of {{'name', 'template'}} objects, "
                    f"got {type(value).__name__}"
                )
            origins = dict.fromkeys(templates, f"{cfg_path} (chat_template)")

        control_tokens = config.get("chat_control_tokens")
        if control_tokens is not None and not (
            isinstance(control_tokens, list) and all(isinstance(t, str) for t in control_tokens)
        ):
            raise FormatError(f"{cfg_path}: chat_control_tokens should be a list of strings, got {control_tokens!r}")

        # transformers' split_special_tokens option: encode special tokens found in text as plain text
        if config.get("split_special_tokens") is True:
            tokenizer.encode_special_tokens = True

        self = cls(
            tokenizer,
            chat_template=templates.get("default"),
            special_tokens=special,
            add_bos_token=add_bos_token,
            name=os.path.basename(os.path.abspath(folder)),
        )
        if len(templates) > 1 or (templates and "default" not in templates):
            self._named_templates = templates
        self._template_origins = origins
        if "default" in origins:
            self._template_origin = origins["default"]
        self._chat_control_tokens = tuple(control_tokens) if control_tokens is not None else None
        return self

    # ---------------------------------------------------------------------------------------------------- basics

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id}, "
            f"chat_template={'yes' if self.chat_template or self._named_templates else 'no'})"
        )

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of a token (as it appears in the vocabulary), or None if there is no such token."""
        if not isinstance(token, str):
            raise InvalidInputError(f"token should be a string, got {type(token).__name__}")
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id, or None if the id has none."""
        token_id = _as_token_id(token_id)
        return self._tok.id_to_token(token_id)

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (like ``<|im_end|>``) become their ids.

        ``add_special_tokens`` runs the tokenizer's post-processor (nothing for Qwen2) and, if the tokenizer config
        asks for it with add_bos_token, puts the BOS token first.
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"encode() needs a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=bool(add_special_tokens)).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of token ids (a list, tuple, numpy array or a single int). Ids with no token are skipped, as
        transformers does; special tokens are left out unless ``skip_special_tokens`` is False."""
        if isinstance(ids, np.ndarray):
            if ids.ndim > 1:
                raise InvalidInputError(f"decode() needs a 1-D sequence of ids, got an array of shape {ids.shape}")
            ids = ids.tolist()
        elif isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            ids = [ids]
        try:
            id_list = [_as_token_id(i) for i in ids]
        except TypeError:
            raise InvalidInputError(f"decode() needs a sequence of token ids, got {type(ids).__name__}") from None
        return self._tok.decode(id_list, skip_special_tokens=bool(skip_special_tokens))

    # ---------------------------------------------------------------------------------------------------- chat

    def apply_chat_template(
        self, messages, add_generation_prompt: bool = True, tools=None, documents=None, **kwargs
    ) -> str:
        """Render ``messages`` (a list of {"role", "content", ...} dicts) with the chat template.

        ``tools`` is a list of JSON-schema dicts and ``documents`` a list of dicts; other keyword arguments become
        template variables (for example ``enable_thinking=False``). Two are handled as transformers does instead:
        ``chat_template`` (a template, or the name of one of the folder's templates) and ``continue_final_message``
        (leave the last message open so the model continues it; this turns off ``add_generation_prompt``).
        """
        rendered, _ = self._render(messages, add_generation_prompt, tools, documents, kwargs, sanitize=False)
        return rendered

    def encode_chat(
        self,
        messages,
        add_generation_prompt: bool = True,
        tools=None,
        documents=None,
        *,
        sanitize_control_tokens: bool = True,
        **kwargs,
    ) -> list[int]:
        """Token ids of the rendered chat (no BOS or other tokens added around it).

        With ``sanitize_control_tokens`` (the default) control tokens written inside the caller's strings, e.g. a user
        typing ``<|im_end|>``, are encoded as ordinary text, so only the template's own control tokens become control
        token ids: the ids equal transformers' ``apply_chat_template(..., tokenize=True,
        sanitize_control_tokens=True)``. With it False the rendered text is encoded as a whole, as transformers does by
        default.
        """
        rendered, marked = self._render(
            messages, add_generation_prompt, tools, documents, kwargs, sanitize=bool(sanitize_control_tokens)
        )
        if not marked:
            return self._encode_plain(rendered)
        return self._encode_marked(rendered)

    def _select_template(self, override, tools) -> tuple[str, str]:
        """The template to render with, and where it came from (for error messages)."""
        origins = self._template_origins
        if override is not None:
            if not isinstance(override, str):
                raise InvalidInputError(f"chat_template should be a string, got {type(override).__name__}")
            if override in self._named_templates:
                return self._named_templates[override], origins.get(override, f"chat template {override!r}")
            return override, _ARGUMENT_ORIGIN
        if self._named_templates:
            if tools is not None and "tool_use" in self._named_templates:
                return self._named_templates["tool_use"], origins.get("tool_use", "chat template 'tool_use'")
            if "default" in self._named_templates:
                return self._named_templates["default"], origins.get("default", self._template_origin)
            raise InvalidInputError(
                f"tokenizer {self.name!r} has several chat templates and none is named 'default'; pick one with "
                f"chat_template=<name>; available: {sorted(self._named_templates)}"
            )
        if self.chat_template is None:
            where = f"tokenizer {self.name!r}" if self.name else "this tokenizer"
            raise InvalidInputError(
                f"{where} has no chat template ({self._missing_template_hint}), so chat messages can't be "
                "formatted; pass chat_template=... or use encode() on plain text"
            )
        return self.chat_template, self._template_origin

    def _control_tokens(self, source: str) -> tuple[str, ...]:
        """The added tokens that count as control tokens in user input: the special ones, plus the listed
        chat_control_tokens, or else the non-whitespace added tokens that the template's literal text contains."""
        if self._chat_control_tokens is not None:
            listed = set(self._chat_control_tokens)
            return tuple(content for content, special in self._added_tokens if special or content in listed)
        literals = _template_literals(source)
        return tuple(
            content
            for content, special in self._added_tokens
            if special or (content in literals and not content.isspace())
        )

    def _render(self, messages, add_generation_prompt, tools, documents, kwargs, *, sanitize: bool):
        """Render the chat; returns (text, whether user strings were marked)."""
        kwargs = dict(kwargs)
        source, origin = self._select_template(kwargs.pop("chat_template", None), tools)
        continue_final = kwargs.pop("continue_final_message", False)
        if continue_final:
            add_generation_prompt = False

        if not isinstance(messages, (list, tuple)):
            raise InvalidInputError(f"messages should be a list of dicts, got {type(messages).__name__}")
        if not messages:
            raise InvalidInputError("messages is empty: a chat needs at least one message")
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise InvalidInputError(
                    f"messages[{index}] should be a dict like {{'role': 'user', 'content': '...'}}, "
                    f"got {type(message).__name__}"
                )
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise InvalidInputError(f"tools should be a list of JSON-schema dicts, got {type(tools).__name__}")
        if documents is not None and not isinstance(documents, (list, tuple)):
            raise InvalidInputError(f"documents should be a list of dicts, got {type(documents).__name__}")
        clash = _RESERVED_TEMPLATE_NAMES.intersection(kwargs)
        if clash:
            raise InvalidInputError(f"{sorted(clash)} can't be passed as extra template variables")

        try:
            template = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            # A broken template from the model folder is a malformed file; one passed by the caller is bad input
            error = InvalidInputError if origin == _ARGUMENT_ORIGIN else FormatError
            raise error(f"{origin}: the chat template has a syntax error at line {e.lineno}: {e.message}") from e

        # Keys set to None are dropped: templates handle a missing key better than a None value
        chat = [{key: value for key, value in message.items() if value is not None} for message in messages]

        marked = False
        if sanitize:
            control_re = self._control_res.get(source)
            if control_re is None:
                control_re = re.compile(_alternation(self._control_tokens(source)))
                if len(self._control_res) < 8:
                    self._control_res[source] = control_re
            chat = _mark(chat, control_re)
            tools = _mark(tools, control_re)
            documents = _mark(documents, control_re)
            kwargs = _mark(kwargs, control_re)
            marked = True

        variables = {**self._template_tokens, **kwargs}  # caller's variables override the special tokens

        if tools is not None:
            for index, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise InvalidInputError(
                        f"tools[{index}] should be a JSON-schema dict (functions are not converted), "
                        f"got {type(tool).__name__}"
                    )
        if documents is not None:
            for index, document in enumerate(documents):
                if not isinstance(document, dict):
                    raise InvalidInputError(
                        f"documents[{index}] should be a dict with 'title' and 'text' keys, "
                        f"got {type(document).__name__}"
                    )
        tools = _plain(tools)
        documents = _plain(documents)
        variables = _plain(variables)
        chat = _alias_reasoning(_plain(chat))

        final_text = None
        if continue_final:
            field = continue_final if isinstance(continue_final, str) else "content"
            final_text = chat[-1].get(field)
            if final_text is None:
                raise InvalidInputError(
                    f'continue_final_message is set but the final message has no "{field}" to continue'
                )
            fields = [field]
            if field in _REASONING_KEYS:
                fields = [key for key in _REASONING_KEYS if chat[-1].get(key) == final_text]
            if not any(name in source for name in fields):
                raise InvalidInputError(
                    f'continue_final_message is set to "{field}" but the chat template ({origin}) never reads it'
                )
            if isinstance(final_text, (list, tuple)):
                for block in reversed(final_text):
                    if isinstance(block, dict) and "text" in block:
                        final_text = block["text"]
                        block["text"] = block["text"] + _CONTINUE_TAG
                        break
                else:
                    raise InvalidInputError(
                        "continue_final_message is set but the final message has no text block to continue"
                    )
            else:
                for name in fields:
                    chat[-1][name] = chat[-1][name] + _CONTINUE_TAG

        try:
            rendered = template.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise InvalidInputError(f"{origin}: rendering the chat failed: {e.message or e}") from e
        except Qwen2rtError:
            raise
        except RecursionError as e:
            raise InvalidInputError(f"{origin}: rendering the chat failed: recursion too deep") from e
        except Exception as e:  # templates are untrusted code driven by the messages: report, don't crash
            raise InvalidInputError(f"{origin}: rendering the chat failed: {type(e).__name__}: {e}") from e

        if continue_final:
            tag = _CONTINUE_TAG.strip()
            if not isinstance(final_text, str) or final_text.strip() not in rendered or tag not in rendered:
                raise InvalidInputError(
                    "continue_final_message is set but the final message does not appear in the rendered chat "
                    f"(the chat template, {origin}, changes or drops it)"
                )
            at = rendered.rindex(tag)
            if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                rendered = rendered[:at]
            else:
                rendered = rendered[:at].rstrip()
        return rendered, marked

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        """Encode text with the tokenizer's normalizer, pre-tokenizer and model only, so that added/special tokens
        in it are not recognised."""
        tok = self._tok
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        splits = [text]
        if tok.pre_tokenizer is not None:
            splits = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for piece in splits for token in tok.model.tokenize(piece)]

    def _encode_piece(self, piece: str, as_text: bool) -> list[int]:
        """Encode a piece from inside a chat. The piece is encoded after a newline (then dropped again), so that
        tokenizers that treat the start of a string specially encode it as they would mid-text."""
        encode = self._encode_without_added_tokens if as_text else self._encode_plain
        ids = encode("\n" + piece)
        n = len(self._newline_ids)
        if ids[:n] == self._newline_ids:
            return ids[n:]
        return encode(piece)

    def _encode_marked(self, chat: str) -> list[int]:
        """Encode a chat rendered from marked inputs: marked control tokens as plain text (markers removed), the rest,
        template control tokens included, normally. A lone marker (a template's string method split a marked token)
        is dropped but still separates the text on its two sides."""
        # [text, marked token, text, marked token, ..., text]; None in place of the token for a lone marker
        pieces = self._markers_re.split(chat)
        ids = self._encode_plain(pieces[0])
        for i in range(1, len(pieces)):
            piece = pieces[i]
            if not piece:
                continue
            as_text = i % 2 == 1
            piece_ids = self._encode_piece(piece, as_text)
            if as_text and self._tok.token_to_id(piece) in piece_ids:
                raise InvalidInputError(
                    f"can't encode {piece!r} from the chat as plain text: the tokenizer produces the token itself"
                )
            ids += piece_ids
        return ids


# --------------------------------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------------------------------


def _as_token_id(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"token ids should be integers, got {value!r}")
    value = int(value)
    if value < 0 or value >= 2**32:
        raise InvalidInputError(f"token id {value} is out of range")
    return value


def _is_added_token_dict(value) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("content"), str)


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(f"{path}: can't be read: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not valid UTF-8 text (byte {e.start})") from e


def _read_json_object(path: str) -> dict:
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except RecursionError:
        raise FormatError(f"{path}: invalid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: should hold a JSON object, got {type(value).__name__}")
    return value


def _compact_tokenizer_json(text: str) -> str:
    """tokenizer.json text as it is written for a converted model: BPE merges as "a b" strings rather
    than ["a", "b"] pairs where no merged piece holds a space (byte-level BPE never does), UTF-8
    rather than \\u escapes, no indentation. tokenizers reads both forms; this one loads in 0.5 s
    with 65 MB of transient heap for Qwen2's 151k merges, the pairs in 0.65 s with 125 MB (the
    peak RSS of a first generate() sits on top of the weights)."""
    data = json.loads(text)
    model = data.get("model") or {}
    merges = model.get("merges")
    if (
        model.get("type") == "BPE"
        and isinstance(merges, list)
        and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] and " " not in m[1] for m in merges)
    ):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _load_tokenizers_file(path: str) -> tokenizers.Tokenizer:
    try:  # the Rust side reads the file itself: no Python copy of its text (11 MB for Qwen2) at the peak
        return tokenizers.Tokenizer.from_file(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - the Rust parser raises a plain Exception, and pyo3's
        cause = e  # PanicException (a BaseException) where it panics on a malformed file
    # Say whether it can't be read, isn't UTF-8, is broken JSON, or is JSON that isn't a tokenizer
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg} (truncated or corrupted file?)"
        ) from cause
    except RecursionError:
        raise FormatError(f"{path}: invalid JSON: nested too deeply") from cause
    if not isinstance(value, dict):
        raise FormatError(f"{path}: should hold a JSON object, got {type(value).__name__}") from cause
    raise FormatError(f"{path}: not a valid tokenizers file: {cause}") from cause
