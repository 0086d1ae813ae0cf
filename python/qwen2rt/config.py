"""Reading and checking a Qwen2 config.json."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from .errors import FormatError, ModelNotFoundError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("qwen2",)
# The largest sizes the C++ core takes (Qwen2Model's constructor checks the same): a config beyond
# them is refused here, naming the file, before the model allocates anything for it.
SIZE_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_hidden_layers": 4096,
    "num_attention_heads": 1 << 20,
    "num_key_value_heads": 1 << 20,
    "head_dim": 1024,
    "max_position_embeddings": 1 << 24,
}
F32_MAX = 3.4028234663852886e38


def short_repr(value: Any) -> str:
    """repr(value), cut short: a hostile config can hold a megabyte where a number belongs."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str | None = None

    def core_dict(self) -> dict[str, Any]:
        """The fields the C++ model takes."""
        return asdict(self)

    # -- sizes, for `qwen2rt info` and the memory check --------------------------------------
    def weight_count(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        qd = self.num_attention_heads * self.head_dim
        kvd = self.num_key_value_heads * self.head_dim
        per_layer = h * qd + 2 * h * kvd + qd * h + 3 * h * i  # matrices
        per_layer += qd + 2 * kvd + 2 * h  # biases, norms
        embed = self.vocab_size * h
        return L * per_layer + embed + h + (0 if self.tie_word_embeddings else embed)

    def kv_cache_bytes(self, max_context: int, bytes_per_value: int = 2) -> int:
        """Bytes of keys and values for max_context positions (f16 by default: 2 bytes a value)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * max_context * bytes_per_value

    @classmethod
    def from_dict(cls, d: Any, source: str = "config.json") -> "Qwen2Config":
        if not isinstance(d, dict):
            raise FormatError(f"{source}: expected a JSON object")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not a Qwen2 model; "
                f"qwen2rt runs model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # transformers 5 nests text configs under text_config for some models; Qwen2 is flat.

        def integer(key: str, default: Any = None, minimum: int = 1) -> int:
            v = d.get(key, default)
            if v is None:
                raise FormatError(f"{source}: missing {key!r}")
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise FormatError(f"{source}: {key!r} must be an integer >= {minimum}, got {short_repr(v)}")
            if v > SIZE_LIMITS[key]:
                raise UnsupportedModelError(
                    f"{source}: {key!r} is {v}, more than qwen2rt supports ({SIZE_LIMITS[key]})"
                )
            return v

        def number(key: str, value: Any, largest: float = float("inf")) -> float:
            # ints too large for a float (JSON allows 1e999 as an integer literal) are refused, not converted
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 < value < largest
                or (isinstance(value, int) and value > 2**1000)
            ):
                raise FormatError(f"{source}: {key!r} must be a positive number, got {short_repr(value)}")
            return float(value)

        hidden = integer("hidden_size")
        heads = integer("num_attention_heads")
        kv_heads = integer("num_key_value_heads", heads)
        head_dim = d.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise FormatError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
            head_dim = hidden // heads
        head_dim = integer("head_dim", head_dim)
        if heads % kv_heads:
            raise FormatError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        if head_dim % 2:
            raise UnsupportedModelError(f"{source}: head_dim {head_dim} is odd; RoPE needs an even head_dim")
        if heads * head_dim > 1 << 20:
            raise UnsupportedModelError(
                f"{source}: num_attention_heads {heads} x head_dim {head_dim} is more than qwen2rt supports ({1 << 20})"
            )

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")

        # Sliding-window attention: Qwen2 configs carry sliding_window but switch it off with
        # use_sliding_window=false; transformers 5 also lists each layer's type.
        if d.get("use_sliding_window"):
            raise UnsupportedModelError(
                f"{source}: use_sliding_window=true (sliding-window attention) is not supported"
            )
        layer_types = d.get("layer_types")
        if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(
                f"{source}: layer_types {sorted(set(map(str, layer_types)))} include sliding attention, not supported"
            )

        # RoPE: plain rotate-half RoPE only. theta from rope_parameters (transformers 5) or rope_theta.
        rope_params = d.get("rope_parameters")
        rope_scaling = d.get("rope_scaling")
        theta = d.get("rope_theta")
        for params in (rope_params, rope_scaling):
            if params is None:
                continue
            if not isinstance(params, dict):
                raise FormatError(f"{source}: rope parameters must be an object, got {params!r}")
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type != "default":
                raise UnsupportedModelError(
                    f"{source}: rope scaling type {rope_type!r} is not supported (only plain RoPE)"
                )
            if params.get("rope_theta") is not None:
                theta = params["rope_theta"]
        theta = number("rope_theta", 10000.0 if theta is None else theta)
        eps = number("rms_norm_eps", d.get("rms_norm_eps", 1e-6), F32_MAX)  # the C++ holds it as a float32
        if eps < 1e-44:
            raise FormatError(f"{source}: 'rms_norm_eps' {eps} is 0 as a float32")

        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise FormatError(f"{source}: tie_word_embeddings must be true or false")
        bos = d.get("bos_token_id")
        return cls(
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope_theta=theta,
            max_position_embeddings=integer("max_position_embeddings", 32768),
            tie_word_embeddings=tie,
            bos_token_id=bos if isinstance(bos, int) else None,
            eos_token_id=tuple(int(e) for e in eos_ids if isinstance(e, int)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "") or None,
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Qwen2Config":
        return cls.from_dict(read_json(path), source=str(path))


def read_json(path: str | os.PathLike, max_bytes: int = 64 << 20) -> Any:
    """A small JSON file, with errors that name it."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ModelNotFoundError(f"{path}: not found") from e
    if size > max_bytes:
        raise FormatError(f"{path}: {size} bytes is too large for a JSON config (limit {max_bytes})")
    if not os.path.isfile(path):  # a folder, or a pipe that would block the read
        raise FormatError(f"{path}: cannot be read (not a regular file)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:  # a folder, or unreadable
        raise FormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({str(e)[:200]})") from e
