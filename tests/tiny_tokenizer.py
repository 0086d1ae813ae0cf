"""Writes a small Qwen2-like tokenizer folder for tests.

``write_tiny_tokenizer(folder)`` trains a byte-level BPE with the same pipeline as Qwen2's tokenizer.json (NFC
normalizer, the Qwen2 split regex followed by ByteLevel without regex, ByteLevel decoder and post-processor) on a small
built-in corpus, adds Qwen2's three special tokens after the trained vocabulary, and writes tokenizer.json and a
tokenizer_config.json carrying the Qwen2.5-Instruct chat template. It is deterministic and takes a few milliseconds.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The pre-tokenization regex of Qwen2's tokenizer.json
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Vocabulary size the BPE trainer aims for (256 byte symbols plus merges); the three special tokens come after it
TRAINED_VOCAB_SIZE = 480

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The chat template shipped in Qwen2.5-Instruct's tokenizer_config.json (default system prompt, tool-call support)
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# A small, mixed training corpus: English prose, Python code, Chinese, emoji, numbers and chat-like text
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.",
    "Language models read text as a sequence of tokens. Each token is an integer id in the vocabulary.",
    "It's a small model, but it's enough for tests: we'll check that encoding and decoding agree.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "What is the weather like in Paris today? It is sunny, with a temperature of 21 degrees.",
    "Please answer the question, and think step by step before you give the final answer.",
    "system\nuser\nassistant\ntool\n<tool_call>\n</tool_call>\n<tool_response>\n</tool_response>\n<tools>\n</tools>",
    '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", "unit": "celsius"}}',
    (
        '{"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": '
        '{"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}'
    ),
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    (
        "import numpy as np\n\n\nclass Model:\n    def __init__(self, dim: int = 64) -> None:\n"
        "        self.weight = np.zeros((dim, dim), dtype=np.float32)\n\n"
        "    def forward(self, x):\n        return x @ self.weight.T\n"
    ),
    'for i in range(10):\n    print(f"step {i}: loss={loss:.4f}")\n    if i % 2 == 0:\n        continue\n',
    "    # indentation with spaces\n\tand tabs\n\n\n  trailing   spaces   and  double  spaces  ",
    "人工智能是计算机科学的一个分支。我们今天学习自然语言处理和大型语言模型。",
    "你好，世界！今天天气很好，我们去公园散步吧。这个模型可以回答中文问题。",
    "通义千问是阿里云开发的大语言模型。请用中文回答下面的问题。",
    "Emoji: 😀 😃 😄 🚀 🔥 👍 ❤️ 🎉 🤖 🌍 — and mixed: hello 👋 world 🌏!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000 123456789",
    "Café, naïve, résumé, Ελληνικά, русский язык,日本語のテキスト, 한국어 문장.",
]


def _corpus():
    # Repeat the corpus so that common pairs have clear counts; the order is fixed, so training is deterministic
    for _ in range(3):
        yield from _CORPUS


def build_tiny_tokenizer() -> Tokenizer:
    """Train and return the tiny Qwen2-like ``tokenizers.Tokenizer`` (special tokens included)."""
    tok = Tokenizer(
        models.BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def tiny_tokenizer_config(chat_template: str | None = QWEN25_CHAT_TEMPLATE) -> dict:
    """The tokenizer_config.json contents, modelled on Qwen2.5-Instruct's."""
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def write_tiny_tokenizer(folder, *, chat_template: str | None = QWEN25_CHAT_TEMPLATE) -> int:
    """Write tokenizer.json and tokenizer_config.json into ``folder`` (created if needed).

    Returns the vocabulary size including the added special tokens; a model using this tokenizer needs a
    vocab_size of at least this.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tok = build_tiny_tokenizer()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tiny_tokenizer_config(chat_template), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return tok.get_vocab_size(with_added_tokens=True)


# llama.cpp token types
NORMAL, CONTROL = 1, 3


def tiny_metadata(folder):
    """GGUF-style tokenizer metadata for the tiny tokenizer written into ``folder``, laid out like llama.cpp's
    converter lays out Qwen2's (control tokens typed 3, the same bos/eos/pad choice)."""
    write_tiny_tokenizer(folder)
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    vocab = data["model"]["vocab"]
    added = {token["id"]: token["content"] for token in data["added_tokens"]}
    n = max([*vocab.values(), *added]) + 1
    tokens = [None] * n
    for token, index in vocab.items():
        tokens[index] = token
    types = [NORMAL] * n
    for index, content in added.items():
        tokens[index] = content
        types[index] = CONTROL
    assert None not in tokens
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "general.architecture": "qwen2",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
        "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": QWEN25_CHAT_TEMPLATE,
    }


def add_tokenizer_metadata(writer, meta: dict) -> None:
    """Puts GGUF tokenizer metadata (as tiny_metadata gives it) into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_pad_token_id(meta["tokenizer.ggml.padding_token_id"])
    if "tokenizer.ggml.add_bos_token" in meta:
        writer.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    if "tokenizer.ggml.add_eos_token" in meta:
        writer.add_add_eos_token(meta["tokenizer.ggml.add_eos_token"])
    if meta.get("tokenizer.chat_template") is not None:
        writer.add_chat_template(meta["tokenizer.chat_template"])
