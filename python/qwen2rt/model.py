"""qwen2rt.Model: load a Qwen2 checkpoint into the C++ core, run it, generate text."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import _core
from .checkpoint import open_checkpoint
from .config import Qwen2Config
from .errors import (
    ContextLengthError,
    FormatError,
    InvalidInputError,
    ModelBusyError,
    OutOfMemoryError,
)
from .generation import Generation, IncrementalDetokenizer, SamplingSettings, StopStrings, TextStream
from .tokenizer import Tokenizer

WEIGHT_DTYPES = ("bf16", "f32", "q8", "q6", "q4")
# Matrices a q4 model keeps in more bits: the quality table in docs/formats.md shows they pay (the
# lm_head is the last word on every logit, and 6 bits give nearly all that 8 did for 3/4 of the
# bytes, which are 40% of what a decode step reads; v_proj is small and sensitive).
Q4_KEEP = {"lm_head": "q6", "v_proj": "q8"}
# Bits per weight of each matrix dtype (q8 / q6 / q4 include their f16 block scales; docs/formats.md).
BITS_PER_WEIGHT = {"f32": 32.0, "bf16": 16.0, "q8": 8.5, "q6": 6.5, "q4": 4.5}
# KV cache element types and their bytes per value.
KV_DTYPES = {"f16": 2, "bf16": 2, "f32": 4}
# Kernel paths with bf16 dot products (AVX-512 BF16; AMX adds bf16 tiles to it): their bf16 prefill
# rounds the tokens to bf16, and their bf16 KV cache is the fast one.
BF16_DOT_ISAS = ("avx512", "amx", "amx-emulated")


def default_kv_dtype(dtype: str) -> str:
    """A 16-bit cache halves what a long-context step reads; f32 models keep an f32 cache, so that they
    stay the exact reference for PyTorch's float32. q4 models take a bf16 cache where the kernels in
    use have bf16 dot products (AVX-512 BF16) and the CPU runs them faster than FMAs (cpu_flags'
    fast_bf16_dot; not Intel's): half the attention's arithmetic, which is most of a decode step at
    8k tokens, for 2% of q4's own KL divergence from f32 (docs/formats.md). bf16 and q8 weights keep
    f16, whose cost is a tenth of theirs."""
    if dtype == "f32":
        return "f32"
    fast = _core.active_isa() in BF16_DOT_ISAS and _core.cpu_flags()["fast_bf16_dot"]
    return "bf16" if dtype == "q4" and fast else "f16"


def matrix_dtype_policy(dtype: str, overrides: dict[str, str] | None, tied: bool):
    """name -> the dtype its matrix is stored in. `overrides` maps a part of a tensor name
    ("lm_head", "v_proj", "layers.0.") to a dtype; for q4 the matrices in Q4_KEEP default to theirs.
    A tied lm_head is the embedding, so what applies to "lm_head" applies to it."""
    rules = dict(Q4_KEEP) if dtype == "q4" else {}
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
        kv_dtype: str | None = None,
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
        self._load_tokenizer: Callable[[], Tokenizer] | None = ckpt.load_tokenizer
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
        kv_dtype = kv_dtype or default_kv_dtype(dtype)
        if kv_dtype not in KV_DTYPES:
            raise InvalidInputError(f"kv_dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")

        threads = default_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidInputError(f"threads must be a positive integer, got {threads!r}")
        if max_context is None:
            max_context = self.config.max_position_embeddings
        if isinstance(max_context, bool) or not isinstance(max_context, int) or not 1 <= max_context <= 1 << 24:
            raise InvalidInputError(f"max_context must be an integer in 1..16777216, got {max_context!r}")
        self._check_memory(max_context, kv_dtype, threads)

        if ckpt.converted is None:
            self._parse_tokenizer_early()
        self._core = _core.Qwen2Model(self.config.core_dict(), dtype, threads, max_context, kv_dtype)
        policy = matrix_dtype_policy(dtype, dtype_overrides, self.config.tie_word_embeddings)
        for name, array, src, shape in ckpt.tensors(threads):
            # a converted model's matrices are stored as they are held (a GGUF embedding: as blocks)
            target = src if ckpt.converted is not None and src in WEIGHT_DTYPES and src != "f32" else policy(name)
            try:
                borrowed = self._core.set_tensor(name, array, src, shape, dtype=target)
            except InvalidInputError as e:  # a tensor the config does not expect, or of the wrong shape
                raise FormatError(f"{path}: {e}") from None
            del array  # a dequantized GGUF tensor is float32: gone before the next one is made
            # The file's pages of a tensor that was copied or converted are not read again; nor are
            # those of an untied embedding (set_tensor's check read all of it). The OS keeps them in
            # its page cache rather than in this process's RSS.
            gathered = name == "model.embed_tokens.weight" and not self.config.tie_word_embeddings
            if not borrowed or gathered:
                ckpt.evict(name)
            if borrowed and gathered and hasattr(os, "pread"):
                # Its rows are then read from the file (pread), not through the mapping: a row read
                # through it maps the 64 KiB of cached pages around it too (the kernel's fault-around),
                # and a 512-token prompt made 52 MB of a converted q4 0.5B's table resident that way.
                file, offset = ckpt.file_range(name)
                self._core.read_embedding_from_file(os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), offset)
        missing = self._core.missing_tensors()
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise FormatError(f"{path}: weights missing: {', '.join(missing[:3])}{more}")
        # The weights left mapped (every page of them read by set_tensor's check) in 2 MiB pages
        # (bytes in 4 KiB pages before and after; None where the OS cannot tell)
        self._small_pages = ckpt.remap_small_pages()
        self._sampler = _core.Sampler()
        self._eos: frozenset[int] | None = None
        # Held by a forward/reset call or by a whole generation (a stream holds it until it ends or
        # is closed): the cache is one sequence, so a second thread is refused, never interleaved.
        self._busy = threading.Lock()

    def _parse_tokenizer_early(self) -> None:
        """Weights converted at load are resident at once; the tokenizer's parse (a transient heap of
        60-100 MB for Qwen2's vocabulary and merges) then goes before them, so that its peak does not
        add to theirs. A tokenizer that fails to parse raises at first use, as it would have."""
        try:
            _ = self.tokenizer
        except Exception:  # raised again, at first use
            pass

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise ModelBusyError(
                "this Model is in use by another thread (or by an unfinished stream): use one Model per thread, "
                "a lock of your own, or finish or close the stream first"
            )

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer: read at load when the weights are converted then (_parse_tokenizer_early),
        else on first use (parsing it takes longer than mapping a converted model's weights)."""
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    assert self._load_tokenizer is not None  # dropped only once the tokenizer is here
                    tok = self._load_tokenizer()
                    if tok.vocab_size > self.config.vocab_size:
                        raise FormatError(
                            f"{self.path}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                            f"vocab_size {self.config.vocab_size}"
                        )
                    self._tokenizer = tok
                    self._load_tokenizer = None  # and what it was read from (a GGUF's metadata)
                    _core.release_free_memory()  # the parse's freed heap, ~100 MB for Qwen2's tokenizer
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation: generation_config's (or config's) eos ids and the tokenizer's."""
        if self._eos is None:
            self._eos = self._eos_ids()
        return self._eos

    # -- memory ---------------------------------------------------------------------------------
    def _check_memory(self, max_context: int, kv_dtype: str, threads: int, sequences: int = 1) -> None:
        weights = int(self.config.weight_count() * BITS_PER_WEIGHT[self.dtype] / 8)
        kv = sequences * self.config.kv_cache_bytes(max_context, KV_DTYPES[kv_dtype])
        scratch = self._scratch_bytes(max_context, threads)
        avail = available_memory()
        if avail is not None and weights + kv + scratch > avail:
            raise OutOfMemoryError(
                f"{self.path}: needs {weights / 2**30:.2f} GiB of weights ({self.dtype}) + {kv / 2**30:.2f} GiB of "
                f"{kv_dtype} KV cache for {sequences} sequence(s) of max_context={max_context} + "
                f"{scratch / 2**30:.2f} GiB of scratch = {weights + kv + scratch} bytes, but only {avail} bytes are "
                f"available; pass a smaller max_context" + (" or fewer sequences" if sequences > 1 else "")
            )

    def _scratch_bytes(self, max_context: int, threads: int) -> int:
        """The C++ forward pass's buffers (qwen2.h Scratch): a chunk of activations, and per thread
        the attention scores of one KV head's query heads over the whole context."""
        c = self.config
        chunk = _core.CHUNK_TOKENS
        qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        widest = max(c.hidden_size, qd, c.intermediate_size)
        rows = 3 * c.hidden_size + 2 * qd + 2 * kvd + 2 * c.intermediate_size + c.head_dim + 2 * widest
        group = c.num_attention_heads // max(1, c.num_key_value_heads)
        return 4 * (chunk * rows + threads * (group * max_context + 32 * c.head_dim))

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
    def forward(
        self, input_ids: Sequence[int] | np.ndarray, start_pos: int = 0, all_logits: bool = False
    ) -> np.ndarray:
        """Runs tokens at positions start_pos.. (attending to every cached position before them).

        Returns float32 logits: the last token's [vocab], or [n, vocab] with all_logits=True.
        start_pos may be anything from 0 to the number of cached positions: rewinding it reuses
        the cached prefix and overwrites what follows.
        """
        self._claim()
        try:
            return self._forward(input_ids, start_pos, all_logits)
        finally:
            self._busy.release()

    def _forward(self, input_ids: Any, start_pos: int = 0, all_logits: bool = False) -> np.ndarray:
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
        self._claim()
        try:
            self._core.reset()
        finally:
            self._busy.release()

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
        prompt: str | Sequence[int] | list[dict] | list,
        max_new_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        drop_oldest: bool = False,
    ) -> Generation | TextStream | list[Generation]:
        """Generates a continuation of `prompt` (text, token ids, or chat messages).

        Sampling settings left as None come from generation_config.json (when it sets do_sample),
        else greedy. It stops at an eos token, at a stop string (not included in the text), at
        max_new_tokens, or when the context is full. Returns a Generation (a str with token_ids,
        finish_reason, prompt_tokens, completion_tokens), or with stream=True a TextStream of text
        pieces whose concatenation is that text.

        A list of prompts (texts, token-id lists or chats) is generated as a batch: one decode step
        runs every unfinished sequence at once, reading each weight once for all of them. It returns
        a list of Generations, each what that prompt would give alone (with the same seed).

        A prompt longer than max_context raises ContextLengthError, unless drop_oldest=True: then
        its oldest tokens are dropped so that max_new_tokens fit after it (keeping at least half of
        the context for the prompt).
        """
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        repetition_penalty=repetition_penalty, seed=seed, stop=stop, drop_oldest=drop_oldest)
        if _is_batch(prompt):
            if stream:
                raise InvalidInputError("stream=True takes one prompt, not a list of prompts")
            batch = BatchGenerator(self, max_batch=len(prompt))
            try:
                for p in prompt:
                    batch.add(p, max_new_tokens, **sampling)
                results: dict[int, Generation] = {}
                while batch.active:
                    for handle, _, done in batch.step():
                        if done is not None:
                            results[handle] = done
            finally:
                batch.close()
            return [results[i] for i in range(len(prompt))]
        seq = self._start(prompt, max_new_tokens, **sampling)
        pieces = self._generate(seq)
        if stream:
            return TextStream(pieces)
        while True:
            try:
                next(pieces)
            except StopIteration as end:
                return end.value

    def chat(self, system: str | None = None) -> "Chat":
        """A conversation that keeps its history; each turn reuses the cached tokens of the ones
        before it, so it prefills only the new message.

        >>> c = model.chat(system="You are terse.")
        >>> c.say("Name a prime.")  # -> Generation
        >>> c.say("And the next one?")
        """
        return Chat(self, system)

    def _start(self, prompt: Any, max_new_tokens: int, temperature=None, top_k=None, top_p=None, min_p=None,
               repetition_penalty=None, seed=None, stop=None, drop_oldest=False) -> "_Sequence":
        """Checks a request and makes its sequence state (nothing runs yet)."""
        ids = self._prompt_ids(prompt)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise InvalidInputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if drop_oldest:
            keep = max(self.max_context - max_new_tokens, (self.max_context + 1) // 2)
            ids = ids[-keep:]
        if len(ids) > self.max_context:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens, more than max_context={self.max_context} "
                f"(pass drop_oldest=True to keep only its last tokens)"
            )
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
        return _Sequence(self, ids, max_new_tokens, settings, np.random.default_rng(seed), stops)

    def _prefill(self, ids: list[int], seq: int = 0) -> np.ndarray:
        """Logits after the prompt, reusing the longest cached prefix of it in sequence slot `seq`
        (the caller holds _busy)."""
        common = min(_common_prefix(self._core.seq_tokens(seq), ids), len(ids) - 1)  # the last token always runs
        return self._core.forward(np.asarray(ids[common:], dtype=np.int32), common, False, seq)

    def _generate(self, seq: "_Sequence") -> Iterator[str]:
        """One sequence in slot 0. It holds _busy from its first step (a stream: from its first
        piece) until it ends or is closed."""
        self._claim()
        try:
            if seq.done:
                return seq.result()
            logits = self._prefill(seq.prompt)
            while True:
                shown = seq.step(logits, room=self.max_context - self.cache_len)
                if shown:
                    yield shown
                if seq.done:
                    return seq.result()
                logits = self._forward([seq.last_token], start_pos=self.cache_len)
        finally:
            self._busy.release()

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
            "kv_dtype": self._core.kv_dtype,
            "config": self.config.core_dict(),
        }

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Model({self.path!r}, dtype={self.dtype!r}, layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"heads={c.num_attention_heads}/{c.num_key_value_heads}, threads={self.threads}, "
            f"max_context={self.max_context})"
        )


def _is_batch(prompt: Any) -> bool:
    """A list of prompts, as opposed to one prompt (a text, token ids, or a chat of dicts)."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt
    )


def _common_prefix(cached: np.ndarray, ids: Sequence[int]) -> int:
    n = min(len(cached), len(ids))
    differs = np.flatnonzero(cached[:n] != np.asarray(ids[:n], dtype=np.int32))
    return int(differs[0]) if differs.size else n


class _Sequence:
    """One sequence being generated: sampling, eos, stop strings and the text shown so far."""

    def __init__(self, model: Model, prompt: list[int], max_new: int, s: SamplingSettings, rng: np.random.Generator,
                 stops: list[str]):
        self.prompt = prompt
        self.max_new = max_new
        self.settings = s
        self.rng = rng
        self._sampler = model._sampler
        self._eos = model.eos_token_ids
        self._detok = IncrementalDetokenizer(model.tokenizer.decode)
        self._stopper = StopStrings(stops)
        self._history = np.zeros(len(prompt) + max_new, dtype=np.int32)  # prompt + generated, for the penalty
        self._history[: len(prompt)] = prompt
        self._n_hist = len(prompt)
        self.tokens: list[int] = []
        self._text: list[str] = []
        self.finish = "length"
        self.done = max_new == 0
        self._hit_stop = False

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    def step(self, logits: np.ndarray, room: int) -> str:
        """Samples the next token from `logits`; returns the text that may be shown now. `room` is
        how many positions the sequence's cache has left."""
        s = self.settings
        token = self._sampler.sample(
            logits, s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty,
            self._history[: self._n_hist], float(self.rng.random()),
        )
        if token in self._eos:
            self.finish = "stop"
            return self._end()
        self.tokens.append(token)
        self._history[self._n_hist] = token
        self._n_hist += 1
        shown, self._hit_stop = self._stopper.feed(self._detok.add(token))
        self._text.append(shown)
        if self._hit_stop:
            self.finish = "stop"
            self.done = True
        elif len(self.tokens) >= self.max_new or room <= 0:
            shown += self._end()
        return shown

    def _end(self) -> str:
        """The rest: an incomplete character at the end, or text held back as a possible stop string."""
        self.done = True
        shown, self._hit_stop = self._stopper.feed(self._detok.flush(), final=True)
        if self._hit_stop:
            self.finish = "stop"
        self._text.append(shown)
        return shown

    def cancel(self) -> None:
        self.done = True
        self.finish = "cancelled"

    def result(self) -> Generation:
        return Generation("".join(self._text), self.tokens, self.finish, len(self.prompt))


class Chat:
    """A multi-turn conversation over one Model (see Model.chat)."""

    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def say(self, content: str, stream: bool = False, **kwargs: Any) -> Generation | TextStream:
        """Adds a user message and generates the reply (generate()'s keyword arguments apply); the
        reply joins the history once it is complete (a stream: once it has been read to the end)."""
        if not isinstance(content, str):
            raise InvalidInputError("a chat message must be a str")
        messages = self.messages + [{"role": "user", "content": content}]
        out = self.model.generate(messages, stream=stream, **kwargs)

        def keep(reply: Generation) -> None:
            self.messages = messages + [{"role": "assistant", "content": str(reply)}]

        if not stream:
            keep(out)
            return out
        return TextStream(_then(out, keep))


def _then(stream: TextStream, done: Any) -> Iterator[str]:
    """The pieces of `stream`, then done(its Generation)."""
    yield from stream
    done(stream.result)
    return stream.result


class BatchGenerator:
    """Continuous batching over one Model: sequences join (add) and leave (when done, or cancel)
    between decode steps, and each step decodes every active sequence at once.

    >>> b = BatchGenerator(model, max_batch=4)
    >>> h = b.add("def f(x):", max_new_tokens=32)
    >>> while b.active:
    ...     for handle, piece, finished in b.step(): ...

    Each sequence owns a KV cache slot; a new one takes the free slot whose cached tokens share the
    longest prefix with its prompt, so a follow-up request (the next turn of a chat) prefills only
    what is new. It holds the Model (other calls get ModelBusyError) until close().
    """

    def __init__(self, model: Model, max_batch: int):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= 256:
            raise InvalidInputError(f"max_batch must be an integer in 1..256, got {max_batch!r}")
        model._claim()
        try:
            if model._core.sequences < max_batch:
                model._check_memory(model.max_context, model._core.kv_dtype, model.threads, sequences=max_batch)
                model._core.set_sequences(max_batch)
        except BaseException:
            model._busy.release()
            raise
        self.model = model
        self.max_batch = max_batch
        self._seqs: dict[int, _Sequence] = {}  # slot -> active sequence
        self._handles: dict[int, int] = {}  # slot -> handle
        self._logits: dict[int, np.ndarray] = {}  # slot -> logits for its next token
        self._next_handle = 0
        self._closed = False

    @property
    def active(self) -> int:
        return len(self._seqs)

    def add(self, prompt: Any, max_new_tokens: int = 256, **sampling: Any) -> int:
        """Prefills a new sequence (same arguments as Model.generate); returns its handle."""
        if self._closed:
            raise InvalidInputError("this BatchGenerator is closed")
        free = [i for i in range(self.max_batch) if i not in self._seqs]
        if not free:
            raise InvalidInputError(f"the batch is full ({self.max_batch} sequences)")
        seq = self.model._start(prompt, max_new_tokens, **sampling)
        slot = max(free, key=lambda i: _common_prefix(self.model._core.seq_tokens(i), seq.prompt))
        if not seq.done:  # before the slot is taken: a prefill that raises leaves the batch as it was
            self._logits[slot] = self.model._prefill(seq.prompt, slot)
        handle = self._next_handle
        self._next_handle += 1
        self._handles[slot] = handle
        self._seqs[slot] = seq
        return handle

    def cancel(self, handle: int) -> None:
        """Drops a sequence (a client went away); its slot is free at once."""
        for slot, h in list(self._handles.items()):
            if h == handle and slot in self._seqs:
                self._seqs.pop(slot).cancel()
                self._logits.pop(slot, None)

    def step(self) -> list[tuple[int, str, Generation | None]]:
        """Samples one token for every active sequence and runs them through the model together.
        Returns (handle, text piece, Generation when that sequence has just finished else None)."""
        events = []
        running = []
        core = self.model._core
        for slot, seq in list(self._seqs.items()):
            room = self.model.max_context - core.seq_len(slot)
            piece = "" if seq.done else seq.step(self._logits.pop(slot), room=room)
            if seq.done:
                events.append((self._handles[slot], piece, seq.result()))
                del self._seqs[slot]
            else:
                events.append((self._handles[slot], piece, None))
                running.append(slot)
        if running:
            tokens = np.array([self._seqs[s].last_token for s in running], dtype=np.int32)
            logits = core.decode_batch(tokens, np.array(running, dtype=np.int32))
            for row, slot in enumerate(running):
                self._logits[slot] = logits[row]
        return events

    def close(self) -> None:
        """Ends every sequence and frees the Model."""
        if not self._closed:
            self._closed = True
            self._seqs.clear()
            self._logits.clear()
            self.model._busy.release()

    def __enter__(self) -> "BatchGenerator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
