"""qwen2rt.Model: load a Qwen2 checkpoint into the C++ core, run it, generate text."""

from __future__ import annotations

import os
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import _core
from .checkpoint import open_checkpoint
from .config import Qwen2Config
from .errors import (
    ContextLengthError,
    FormatError,
    InvalidInputError,
    OutOfMemoryError,
)
from .generation import Generation, IncrementalDetokenizer, SamplingSettings, StopStrings, TextStream
from .tokenizer import Tokenizer

WEIGHT_DTYPES = ("bf16", "f32", "q8", "q4")
# Matrices that stay in q8 when the rest is q4: the quality table in docs/formats.md shows they pay
# (the lm_head is the last word on every logit; v_proj is small and sensitive).
Q4_KEEP_Q8 = ("lm_head", "v_proj")
# Bits per weight of each matrix dtype (q8 / q4 include their f16 block scales; docs/formats.md).
BITS_PER_WEIGHT = {"f32": 32.0, "bf16": 16.0, "q8": 8.5, "q4": 4.5}


def matrix_dtype_policy(dtype: str, overrides: dict[str, str] | None, tied: bool):
    """name -> the dtype its matrix is stored in. `overrides` maps a part of a tensor name
    ("lm_head", "v_proj", "layers.0.") to a dtype; for q4 the matrices in Q4_KEEP_Q8 default to q8.
    A tied lm_head is the embedding, so what applies to "lm_head" applies to it."""
    rules = {key: "q8" for key in Q4_KEEP_Q8} if dtype == "q4" else {}
    for key, value in (overrides or {}).items():
        if value not in WEIGHT_DTYPES:
            raise InvalidInputError(f"dtype_overrides[{key!r}] = {value!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        rules[key] = value
    if tied and "lm_head" in rules and "embed_tokens" not in rules:
        rules["embed_tokens"] = rules["lm_head"]

    def policy(name: str) -> str:
        return next((v for k, v in rules.items() if k in name), dtype)

    return policy


def default_threads() -> int:
    """QWEN2RT_THREADS if set, else the cores this process may run on."""
    env = os.environ.get("QWEN2RT_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise InvalidInputError(f"QWEN2RT_THREADS={env!r} is not an integer") from None
        if n < 1:
            raise InvalidInputError(f"QWEN2RT_THREADS={env!r} must be >= 1")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """MemAvailable in bytes (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Model:
    """A Qwen2-architecture model on the CPU.

    >>> m = Model("path/to/Qwen2.5-0.5B-Instruct")
    >>> print(m.generate([{"role": "user", "content": "Hi!"}], max_new_tokens=32))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype: str | None = None,
        threads: int | None = None,
        max_context: int | None = None,
        dtype_overrides: dict[str, str] | None = None,
    ):
        path = os.fspath(path)
        if dtype is not None and dtype not in WEIGHT_DTYPES:
            raise InvalidInputError(f"dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        registry_defaults: dict[str, Any] = {}
        if not os.path.exists(path):
            # A registry name ("qwen2.5-coder-0.5b-instruct"): pulled on first use.
            from . import registry

            name = path
            path = registry.resolve(name)  # raises ModelNotFoundError listing the known names
            registry_defaults = registry.lookup(name).generation_config
        ckpt = open_checkpoint(path)
        self.path = path
        self.config: Qwen2Config = ckpt.config
        self.generation_config = {**registry_defaults, **ckpt.generation_config}
        self._load_tokenizer = ckpt.load_tokenizer
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_lock = threading.Lock()
        if ckpt.converted is not None:  # already quantized and laid out: mapped as it is
            if dtype not in (None, ckpt.converted.dtype):
                raise InvalidInputError(
                    f"{path} is a {ckpt.converted.dtype} model converted by qwen2rt; it cannot be loaded as {dtype} "
                    f"(convert the original weights again)"
                )
            if dtype_overrides:
                raise InvalidInputError(f"{path} is a converted model: dtype_overrides do not apply")
            dtype = ckpt.converted.dtype
        dtype = dtype or "bf16"
        self.dtype = dtype

        threads = default_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidInputError(f"threads must be a positive integer, got {threads!r}")
        if max_context is None:
            max_context = self.config.max_position_embeddings
        if isinstance(max_context, bool) or not isinstance(max_context, int) or not 1 <= max_context <= 1 << 24:
            raise InvalidInputError(f"max_context must be an integer in 1..16777216, got {max_context!r}")
        self._check_memory(max_context)

        self._core = _core.Qwen2Model(self.config.core_dict(), dtype, threads, max_context)
        policy = matrix_dtype_policy(dtype, dtype_overrides, self.config.tie_word_embeddings)
        for name, array, src, shape in ckpt.tensors(threads):
            target = src if ckpt.converted is not None and src != "f32" else policy(name)
            try:
                self._core.set_tensor(name, array, src, shape, dtype=target)
            except InvalidInputError as e:  # a tensor the config does not expect, or of the wrong shape
                raise FormatError(f"{path}: {e}") from None
        missing = self._core.missing_tensors()
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FormatError(f"{path}: weights missing: {', '.join(missing[:3])}{more}")
        self._sampler = _core.Sampler()
        self._eos: frozenset[int] | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer, read on first use (parsing it takes longer than mapping the weights)."""
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    tok = self._load_tokenizer()
                    if tok.vocab_size > self.config.vocab_size:
                        raise FormatError(
                            f"{self.path}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                            f"vocab_size {self.config.vocab_size}"
                        )
                    self._tokenizer = tok
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation: generation_config's (or config's) eos ids and the tokenizer's."""
        if self._eos is None:
            self._eos = self._eos_ids()
        return self._eos

    # -- memory ---------------------------------------------------------------------------------
    def _check_memory(self, max_context: int) -> None:
        weights = int(self.config.weight_count() * BITS_PER_WEIGHT[self.dtype] / 8)
        kv = self.config.kv_cache_bytes(max_context)
        avail = available_memory()
        if avail is not None and weights + kv > avail:
            raise OutOfMemoryError(
                f"{self.path}: needs {weights / 2**30:.2f} GiB of weights ({self.dtype}) + {kv / 2**30:.2f} GiB of "
                f"KV cache for max_context={max_context} = {(weights + kv)} bytes, but only {avail} bytes are "
                f"available; pass a smaller max_context"
            )

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos = self.generation_config.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(e for e in eos if isinstance(e, int))
        if not ids:
            ids.update(self.config.eos_token_id)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # -- properties -----------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        return self._core.threads

    @property
    def max_context(self) -> int:
        return self._core.max_context

    @property
    def cache_len(self) -> int:
        """How many positions of the KV cache hold valid keys and values."""
        return self._core.cache_len

    # -- running the network --------------------------------------------------------------------
    def forward(self, input_ids: Sequence[int] | np.ndarray, start_pos: int = 0, all_logits: bool = False) -> np.ndarray:
        """Runs tokens at positions start_pos.. (attending to every cached position before them).

        Returns float32 logits: the last token's [vocab], or [n, vocab] with all_logits=True.
        start_pos may be anything from 0 to the number of cached positions: rewinding it reuses
        the cached prefix and overwrites what follows.
        """
        ids = self._as_ids(input_ids)
        if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
            raise InvalidInputError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        start_pos = int(start_pos)
        if start_pos > self.cache_len:
            raise InvalidInputError(
                f"start_pos {start_pos} is past the {self.cache_len} cached positions; "
                f"use a start_pos in 0..{self.cache_len}"
            )
        if start_pos + len(ids) > self.max_context:
            raise ContextLengthError(
                f"{len(ids)} tokens at position {start_pos} need {start_pos + len(ids)} positions, "
                f"more than max_context={self.max_context}"
            )
        return self._core.forward(ids, start_pos, all_logits)

    def reset(self) -> None:
        """Forgets every cached position."""
        self._core.reset()

    def _as_ids(self, input_ids: Any) -> np.ndarray:
        if isinstance(input_ids, str):
            raise InvalidInputError("forward takes token ids; use tokenize() for text")
        try:
            ids = np.asarray(input_ids)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"input_ids must be a sequence of token ids ({e})") from None
        if ids.ndim != 1 or ids.size == 0:
            raise InvalidInputError(f"input_ids must be a non-empty 1-D sequence of ids, got shape {ids.shape}")
        if ids.dtype.kind not in "iu":
            raise InvalidInputError(f"token ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise InvalidInputError(
                f"token id {int(ids[i])} at index {i} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )
        return ids.astype(np.int32)

    # -- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = self.tokenizer.encode_chat(list(prompt), add_generation_prompt=True)
        else:
            ids = self._as_ids(prompt).tolist()
        if not ids:
            raise InvalidInputError("the prompt is empty")
        return ids

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int] | list[dict],
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> Generation | TextStream:
        """Generates a continuation of `prompt` (text, token ids, or chat messages).

        Sampling settings left as None come from generation_config.json (when it sets do_sample),
        else greedy. It stops at an eos token, at a stop string (not included in the text), at
        max_new_tokens, or when the context is full. Returns a Generation (a str with token_ids,
        finish_reason, prompt_tokens, completion_tokens), or with stream=True a TextStream of text
        pieces whose concatenation is that text.
        """
        ids = self._prompt_ids(prompt)
        if len(ids) > self.max_context:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens, more than max_context={self.max_context}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        settings = SamplingSettings.resolve(
            self.generation_config,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise InvalidInputError("stop must be a string or a list of strings")
        rng = np.random.default_rng(seed)
        pieces = self._generate(ids, max_new_tokens, settings, rng, stops)
        if stream:
            return TextStream(pieces)
        while True:
            try:
                next(pieces)
            except StopIteration as end:
                return end.value

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Logits after the prompt, reusing the longest cached prefix of it."""
        cached = self._core.cached_tokens
        n = min(len(cached), len(ids))
        differs = np.flatnonzero(cached[:n] != np.asarray(ids[:n], dtype=np.int32))
        common = int(differs[0]) if differs.size else n
        common = min(common, len(ids) - 1)  # the last prompt token always runs: its logits are needed
        return self.forward(ids[common:], start_pos=common)

    def _generate(
        self, prompt: list[int], max_new: int, s: SamplingSettings, rng: np.random.Generator, stops: list[str]
    ) -> Iterator[str]:
        detok = IncrementalDetokenizer(self.tokenizer.decode)
        stopper = StopStrings(stops)
        history = np.zeros(len(prompt) + max_new, dtype=np.int32)  # prompt + generated, for the penalty
        history[: len(prompt)] = prompt
        n_hist = len(prompt)
        out: list[int] = []
        text: list[str] = []
        finish = "length"
        hit_stop_string = False

        if max_new > 0:
            logits = self._prefill(prompt)
            while True:
                token = self._sampler.sample(
                    logits, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty,
                    history[:n_hist], float(rng.random()),
                )
                if token in self.eos_token_ids:
                    finish = "stop"
                    break
                out.append(token)
                history[n_hist] = token
                n_hist += 1
                shown, hit_stop_string = stopper.feed(detok.add(token))
                if shown:
                    text.append(shown)
                    yield shown
                if hit_stop_string:
                    finish = "stop"
                    break
                if len(out) >= max_new or self.cache_len >= self.max_context:
                    break
                logits = self.forward([token], start_pos=self.cache_len)
        if not hit_stop_string:
            # the rest: an incomplete character at the end, or text held back as a possible stop string
            shown, hit_stop_string = stopper.feed(detok.flush(), final=True)
            if hit_stop_string:
                finish = "stop"
            if shown:
                text.append(shown)
                yield shown
        return Generation("".join(text), out, finish, len(prompt))

    # -- description ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "dtype": self.dtype,
            "threads": self.threads,
            "max_context": self.max_context,
            "isa": _core.active_isa(),
            "weight_bytes": self._core.weight_bytes,
            "kv_cache_bytes": self._core.kv_cache_bytes,
            "config": self.config.core_dict(),
        }

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({self.path!r}, dtype={self.dtype!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"heads={c.num_attention_heads}/{c.num_key_value_heads}, threads={self.threads}, "
            f"max_context={self.max_context})"
        )
