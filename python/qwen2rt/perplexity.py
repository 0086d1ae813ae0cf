"""Perplexity and KL divergence over a text, in non-overlapping windows (as llama.cpp's perplexity tool).

Each window of `ctx` tokens starts from an empty cache; its first half is context only and the
tokens of its second half are scored. With a reference (another model, another dtype, or logits
saved earlier), the same positions also give the KL divergence KL(reference || model) and how often
both put the same token on top. This is the yardstick for weight formats and speed changes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np

from .errors import InvalidInputError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclass
class Score:
    tokens: int  # scored tokens
    windows: int
    ctx: int
    perplexity: float
    perplexity_stderr: float  # of the mean negative log-likelihood, carried to perplexity
    mean_kl: float | None = None
    p99_kl: float | None = None
    max_kl: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def windows(ids: list[int], ctx: int, max_windows: int | None = None) -> Iterator[list[int]]:
    if ctx < 4:
        raise InvalidInputError(f"ctx must be at least 4, got {ctx}")
    n = len(ids) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise InvalidInputError(f"the text has {len(ids)} tokens, fewer than one window of ctx={ctx}")
    for w in range(n):
        yield ids[w * ctx : (w + 1) * ctx]


def window_logits(model, window: list[int]) -> np.ndarray:
    """Logits predicting tokens window[h:], h = len(window) // 2: one row per scored token."""
    h = len(window) // 2
    model.reset()
    first = model.forward(window[:h])[None]
    rest = model.forward(window[h:-1], start_pos=h, all_logits=True)
    return np.concatenate([first, rest])


def evaluate(
    model,
    ids: list[int],
    ctx: int = 512,
    max_windows: int | None = None,
    reference: Callable[[int, list[int]], np.ndarray] | None = None,
    on_window: Callable[[int, int], None] | None = None,
    keep_logprobs: list | None = None,
) -> Score:
    """Scores `model` on `ids`. `reference(window_index, window)` returns the reference logits (or
    log-probabilities) for the same rows as window_logits; `keep_logprobs`, if a list, receives each
    window's log-probabilities as float16 (to save them as a reference for later runs)."""
    nll, kls, agree = [], [], []
    wins = list(windows(ids, ctx, max_windows))
    for w, window in enumerate(wins):
        lp = log_softmax(window_logits(model, window))
        targets = np.asarray(window[len(window) // 2 :])
        nll.append(-lp[np.arange(len(targets)), targets])
        if keep_logprobs is not None:
            keep_logprobs.append(lp.astype(np.float16))
        if reference is not None:
            ref = log_softmax(np.asarray(reference(w, window), dtype=np.float64))
            if ref.shape != lp.shape:
                raise InvalidInputError(f"reference rows {ref.shape} do not match the model's {lp.shape}")
            p = np.exp(ref)
            kls.append((p * (ref - lp)).sum(axis=-1))
            agree.append(ref.argmax(-1) == lp.argmax(-1))
        if on_window:
            on_window(w + 1, len(wins))
    nll_all = np.concatenate(nll)
    mean = float(nll_all.mean())
    stderr = float(nll_all.std(ddof=1) / math.sqrt(len(nll_all))) if len(nll_all) > 1 else 0.0
    s = Score(
        tokens=len(nll_all), windows=len(wins), ctx=ctx, perplexity=math.exp(mean),
        perplexity_stderr=math.exp(mean) * stderr,
    )
    if kls:
        kl = np.concatenate(kls)
        s.mean_kl = float(kl.mean())
        s.p99_kl = float(np.percentile(kl, 99))
        s.max_kl = float(kl.max())
        s.top1_agreement = float(np.concatenate(agree).mean())
    return s


def model_reference(ref_model) -> Callable[[int, list[int]], np.ndarray]:
    return lambda w, window: window_logits(ref_model, window)


def save_logprobs(path: str, ids: list[int], ctx: int, logprobs: list[np.ndarray]) -> None:
    arrays = {}
    for w, (window, lp) in enumerate(zip(windows(ids, ctx, len(logprobs)), logprobs)):
        arrays[f"w{w}"] = lp
        arrays[f"t{w}"] = np.asarray(window, dtype=np.int32)
    np.savez(path, **arrays)


def saved_reference(path: str) -> Callable[[int, list[int]], np.ndarray]:
    """Log-probabilities saved by `qwen2rt perplexity --save-logprobs` (an .npz, one array a window)."""
    data = np.load(path)

    def get(w: int, window: list[int]) -> np.ndarray:
        if f"w{w}" not in data:
            raise InvalidInputError(f"{path}: no saved window {w}; it was made with fewer windows")
        if not np.array_equal(data[f"t{w}"], window):
            raise InvalidInputError(f"{path}: window {w} was saved for other tokens (another text, tokenizer or ctx)")
        return data[f"w{w}"]

    return get
