"""Generation glue: sampling settings, incremental detokenization, stop strings, results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from .errors import InvalidInputError


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def resolve(cls, gen_config: dict[str, Any], **given: Any) -> "SamplingSettings":
        """The caller's values, else generation_config.json's (when it samples), else off.

        As in transformers, generation_config's temperature/top_k/top_p/min_p only apply when it
        says do_sample=true; a caller's temperature > 0 turns sampling on by itself.
        """
        samples = bool(gen_config.get("do_sample", False))

        def pick(key: str, off: Any) -> Any:
            if given.get(key) is not None:
                return given[key]
            if key == "repetition_penalty" or samples:
                v = gen_config.get(key)
                if v is not None:
                    return v
            return off

        temperature = given.get("temperature")
        if temperature is None:
            temperature = float(gen_config.get("temperature", 1.0) or 1.0) if samples else 0.0
        s = cls(
            temperature=float(temperature),
            top_k=int(pick("top_k", 0)),
            top_p=float(pick("top_p", 1.0)),
            min_p=float(pick("min_p", 0.0)),
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
        )
        s.check()
        return s

    def check(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_k < 2**31:
            raise InvalidInputError(f"top_k must be in 0..2**31-1, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidInputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0.0) or self.repetition_penalty == float("inf"):
            raise InvalidInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces without splitting a UTF-8 character.

    It decodes a short window of recent tokens twice (up to the last emitted token, and up to the
    newest) and emits the difference once it no longer ends in an incomplete character (U+FFFD).
    Decoding from the same window start keeps decoders that treat the first token specially honest.
    """

    def __init__(self, decode, skip_special_tokens: bool = True):
        self._decode = decode
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into emitted text

    def _text(self, a: int, b: int) -> str:
        return self._decode(self.ids[a:b], skip_special_tokens=self._skip) if b > a else ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._text(self._prefix, self._read)
        after = self._text(self._prefix, len(self.ids))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included (as U+FFFD)."""
        before = self._text(self._prefix, self._read)
        after = self._text(self._prefix, len(self.ids))
        self._prefix = self._read = len(self.ids)
        return after[len(before) :]


class StopStrings:
    """Holds back text that could be the start of a stop string; cuts the text at the first one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False


class Generation(str):
    """The generated text (a str), with the token ids, why it stopped, and token counts."""

    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_new_tokens or context full)
    prompt_tokens: int
    completion_tokens: int

    def __new__(cls, text: str, token_ids: list[int], finish_reason: str, prompt_tokens: int):
        self = super().__new__(cls, text)
        self.token_ids = list(token_ids)
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = len(token_ids)
        return self

    @property
    def text(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return (
            f"Generation(text={self.text!r}, finish_reason={self.finish_reason!r}, "
            f"prompt_tokens={self.prompt_tokens}, completion_tokens={self.completion_tokens})"
        )


class TextStream:
    """Iterator over the text pieces of a generation. Leaving the loop early (break, close(), or
    dropping the iterator) stops the generation; `result` holds the Generation once it has ended."""

    def __init__(self, pieces: Iterator[str]):
        self._pieces = pieces
        self.result: Generation | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except StopIteration as end:
            self.result = end.value
            raise StopIteration from None

    def close(self) -> None:
        self._pieces.close()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
