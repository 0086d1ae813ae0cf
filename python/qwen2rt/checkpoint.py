"""Model files on disk: a Hugging Face folder or a GGUF file, seen the same way by Model.

A checkpoint gives the config, the generation defaults, the tokenizer, and the weights as
(Hugging Face tensor name, numpy array, dtype, logical shape) — mapped from the file where the bytes
can be used as they are, dequantized to float32 where they are a GGUF block format. A converted
qwen2rt folder (converted.py) is a Hugging Face folder whose safetensors hold packed q8/q4 bytes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterator

import numpy as np

from .config import Qwen2Config, read_json, short_repr
from .converted import ConvertedWeights, is_converted
from .errors import FormatError, InvalidInputError, ModelNotFoundError, UnsupportedModelError
from .safetensors_io import DTYPES, SafetensorsFile
from .tokenizer import Tokenizer

# Tensors some checkpoints carry that the model recomputes itself.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


_LAYER_NAME = re.compile(r"model\.layers\.(\d{1,9})\.(.+)")  # more digits: not a layer (and int() would refuse them)


def check_tensors(cfg: Qwen2Config, shapes: dict[str, tuple[int, ...]], path: str) -> None:
    """Every tensor the config implies is present, with the shape it implies (Hugging Face names,
    logical shapes). Checked before the model allocates what the config's sizes ask for, so that a
    config that disagrees with its weights costs nothing; the C++ checks the same again."""
    H, FF, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    QD, KVD = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    top = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = (V, H)
    layer = {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (QD, H),
        "self_attn.q_proj.bias": (QD,),
        "self_attn.k_proj.weight": (KVD, H),
        "self_attn.k_proj.bias": (KVD,),
        "self_attn.v_proj.weight": (KVD, H),
        "self_attn.v_proj.bias": (KVD,),
        "self_attn.o_proj.weight": (H, QD),
        "post_attention_layernorm.weight": (H,),
        "mlp.gate_proj.weight": (FF, H),
        "mlp.up_proj.weight": (FF, H),
        "mlp.down_proj.weight": (H, FF),
    }
    for name, shape in shapes.items():
        want = top.get(name)
        m = _LAYER_NAME.fullmatch(name)
        if want is None and m:
            if int(m.group(1)) >= cfg.num_hidden_layers:
                raise FormatError(f"{path}: tensor {name!r} is past the config's {cfg.num_hidden_layers} layers")
            want = layer.get(m.group(2))
        if want is not None and tuple(shape) != want:
            raise FormatError(f"{path}: tensor {name!r} has shape {list(shape)}, the config implies {list(want)}")
    missing = [n for n in top if n not in shapes]
    missing += [
        n for i in range(cfg.num_hidden_layers) for n in (f"model.layers.{i}.{r}" for r in layer) if n not in shapes
    ]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FormatError(f"{path}: weights missing: {', '.join(missing[:3])}{more}")


# generation_config.json keys that qwen2rt reads, and the JSON types they may have (null: not set)
_GENERATION_TYPES = {
    "do_sample": (bool,),
    "temperature": (int, float),
    "top_k": (int,),
    "top_p": (int, float),
    "min_p": (int, float),
    "repetition_penalty": (int, float),
}


def check_generation_config(gc: Any, path: str) -> dict[str, Any]:
    """The sampling defaults and eos ids, checked at load: a bad value is the file's fault, not the caller's."""
    from .generation import SamplingSettings

    if not isinstance(gc, dict):
        raise FormatError(f"{path}: expected a JSON object")
    for key, types in _GENERATION_TYPES.items():
        v = gc.get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            raise FormatError(f"{path}: {key} must be {' or '.join(t.__name__ for t in types)}, got {short_repr(v)}")
    if isinstance(gc.get("top_k"), int) and gc["top_k"] >= 2**31:
        raise FormatError(f"{path}: top_k {gc['top_k']} is too large")
    eos = gc.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids):
        raise FormatError(f"{path}: eos_token_id must be a token id or a list of them, got {short_repr(eos)}")
    try:  # the ranges, as generate() will check them (do_sample on, so that every value is read)
        SamplingSettings.resolve({**gc, "do_sample": True})
    except (InvalidInputError, OverflowError) as e:
        raise FormatError(f"{path}: {e}") from None
    return gc


class HFCheckpoint:
    """A Hugging Face model folder: config.json, safetensors weights (single or sharded),
    tokenizer files, generation_config.json."""

    def __init__(self, folder: str):
        self.path = folder
        self.config = Qwen2Config.from_file(os.path.join(folder, "config.json"))
        gen_path = os.path.join(folder, "generation_config.json")
        self.generation_config: dict[str, Any] = {}
        if os.path.exists(gen_path):
            gc = read_json(gen_path)
            self.generation_config = check_generation_config(gc, gen_path)
        self.files = self._weight_files()
        # Parsing tokenizer.json takes longer than mapping the weights: Model does it on first use.
        if not os.path.exists(os.path.join(folder, "tokenizer.json")):
            raise ModelNotFoundError(f"{folder}: tokenizer.json not found")
        self.load_tokenizer = lambda: Tokenizer.from_hf_folder(folder)
        # a converted qwen2rt folder: one safetensors file whose metadata names the format
        self.converted: ConvertedWeights | None = None
        first = next(iter(self.files.values()), None)
        if first is not None and is_converted(first.metadata):
            self.converted = ConvertedWeights(first)
            check_tensors(self.config, self.converted.shapes, first.path)
        else:
            shapes = {name: f.tensors[name].shape for name, f in self.files.items()}
            check_tensors(self.config, shapes, self.path)

    def _weight_files(self) -> dict[str, SafetensorsFile]:
        """tensor name -> the file holding it."""
        index = os.path.join(self.path, "model.safetensors.index.json")
        single = os.path.join(self.path, "model.safetensors")
        if os.path.exists(index):
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError(f"{index}: no 'weight_map' object")
            shards: dict[str, SafetensorsFile] = {}
            where: dict[str, SafetensorsFile] = {}
            for name, fname in weight_map.items():
                if (
                    not isinstance(fname, str)
                    or os.path.basename(fname) != fname
                    or fname in ("", ".", "..")
                    or "\0" in fname
                ):
                    raise FormatError(
                        f"{index}: shard name {short_repr(fname)} for {name!r} is not a file name in the folder"
                    )
                if fname not in shards:
                    shards[fname] = SafetensorsFile(os.path.join(self.path, fname))
                if name not in shards[fname].tensors:
                    raise FormatError(f"{index}: {name!r} is mapped to {fname}, which does not hold it")
                where[name] = shards[fname]
            return where
        if os.path.exists(single):
            f = SafetensorsFile(single)
            return {name: f for name in f.names()}
        others = sorted(n for n in os.listdir(self.path) if n.endswith((".bin", ".pt", ".pth", ".gguf")))
        hint = f" (found {', '.join(others)}; qwen2rt reads safetensors)" if others else ""
        raise ModelNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json{hint}")

    def evict(self, name: str) -> None:
        """Drop a mapped tensor's pages from resident memory (see SafetensorsFile.evict)."""
        f = self.converted.file if self.converted is not None else self.files[name]
        f.evict(name)

    def file_range(self, name: str) -> tuple[str, int]:
        """The file that holds a tensor, and the offset of its first byte there."""
        f = self.converted.file if self.converted is not None else self.files[name]
        return f.file_range(name)

    def remap_small_pages(self) -> tuple[int, int] | None:
        """The weights this process maps (borrowed at load), where cached in 4 KiB pages, read again as
        2 MiB ones: bytes in 4 KiB pages before and after, over every file (safetensors_io)."""
        if self.converted is not None:
            files = [self.converted.file]
        else:
            files = list({id(f): f for f in self.files.values()}.values())  # shards, each once
        before = after = 0
        for f in files:
            r = f.remap_small_pages()
            if r is None:
                return None
            before, after = before + r[0], after + r[1]
        return before, after

    def tensors(self, threads: int = 1) -> Iterator[tuple[str, np.ndarray, str, list[int]]]:
        if self.converted is not None:
            yield from self.converted.tensors()
            return
        for name, f in self.files.items():
            if name.endswith(IGNORED_TENSOR_SUFFIXES):
                continue
            kind = DTYPES[f.tensors[name].dtype][1]
            if kind is None:
                raise UnsupportedModelError(
                    f"{f.path}: tensor {name!r} has dtype {f.tensors[name].dtype}; "
                    f"qwen2rt reads F32, BF16 and F16 weights"
                )
            array = f.array(name)
            yield name, array, kind, list(array.shape)


# GGUF tensor names (llama.cpp's) -> Hugging Face names.
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_BLOCK = re.compile(r"blk\.(\d{1,9})\.(.+)")

# Tokens that end a turn besides the file's eos id, as Qwen2 instruct models' generation_config lists.
_END_OF_TURN = ("<|endoftext|>", "<|im_end|>")


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{int(m.group(1))}.{_GGUF_LAYER[m.group(2)]}"
    return None


def _gguf_tokenizer_loader(md: dict[str, Any], path: str) -> Callable[[], Tokenizer]:
    """The GGUF tokenizer, built once from the metadata; the token, type and merge lists it was built
    from (some 40 MB of Python strings for Qwen2's 151k tokens) are then dropped from the metadata."""
    from .gguf_tokenizer import tokenizer_from_gguf

    def load() -> Tokenizer:
        tok = tokenizer_from_gguf(md, source=path)
        for key in [k for k, v in md.items() if k.startswith("tokenizer.ggml.") and isinstance(v, list)]:
            del md[key]
        return tok

    return load


class GGUFCheckpoint:
    """A GGUF file (llama.cpp's format): config from the qwen2.* metadata, the tokenizer and chat
    template from tokenizer.* metadata, block-format weights dequantized to float32 at load."""

    converted = None  # never a converted qwen2rt model

    def __init__(self, path: str):
        from .gguf_io import GGUFFile

        self.path = path
        self.file = GGUFFile(path)
        md = self.file.metadata
        self.config = self._config(md)
        self.load_tokenizer = _gguf_tokenizer_loader(md, path)
        # an eos id outside the vocabulary is reported by the tokenizer (gguf_tokenizer.py), which names the key
        eos = md.get("tokenizer.ggml.eos_token_id")
        eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) and 0 <= eos < 2**31 else []
        tokens = md.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            eos += [i for i, t in enumerate(tokens) if t in _END_OF_TURN]
        self.generation_config: dict[str, Any] = check_generation_config(
            {"eos_token_id": sorted(set(eos)), **self._sampling(md)}, path
        )
        names = {}
        for name in self.file.tensors:
            hf = gguf_to_hf_name(name)
            if hf is None:
                raise UnsupportedModelError(f"{path}: unexpected tensor {name!r} for a qwen2 model")
            names[hf] = name
        self.names = names
        check_tensors(self.config, {hf: self.file.tensors[name].numpy_shape for hf, name in names.items()}, path)

    @staticmethod
    def _sampling(md: dict[str, Any]) -> dict[str, Any]:
        """Sampling defaults that newer converters store as general.sampling.*, as generation_config keys."""
        keys = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                "penalty_repeat": "repetition_penalty"}
        out = {hf: md[f"general.sampling.{k}"] for k, hf in keys.items()
               if isinstance(md.get(f"general.sampling.{k}"), (int, float))}
        if out:
            out["do_sample"] = out.get("temperature", 1.0) > 0
        return out

    def _config(self, md: dict[str, Any]) -> Qwen2Config:
        arch = md.get("general.architecture")
        if arch != "qwen2":
            raise UnsupportedModelError(f"{self.path}: general.architecture is {arch!r}; qwen2rt runs 'qwen2'")
        scaling = md.get("qwen2.rope.scaling.type")
        if scaling not in (None, "none"):
            raise UnsupportedModelError(f"{self.path}: rope scaling type {scaling!r} is not supported")
        embd = self.file.tensors.get("token_embd.weight")
        if embd is None or len(embd.shape) != 2:
            raise FormatError(f"{self.path}: no 2-D token_embd.weight tensor")

        def get(key: str, default: Any = None, integer: bool = True) -> Any:
            v = md.get(f"qwen2.{key}", default)
            if v is None:
                raise FormatError(f"{self.path}: metadata qwen2.{key} is missing")
            if integer and (isinstance(v, bool) or not isinstance(v, int)):
                raise FormatError(f"{self.path}: metadata qwen2.{key} must be an integer, got {short_repr(v)}")
            return v

        heads = get("attention.head_count")
        hidden = get("embedding_length")
        d = {
            "model_type": "qwen2",
            "vocab_size": embd.shape[1],
            "hidden_size": hidden,
            "intermediate_size": get("feed_forward_length"),
            "num_hidden_layers": get("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": get("attention.head_count_kv", heads),
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon", integer=False),
            "rope_theta": get("rope.freq_base", 10000.0, integer=False),
            "max_position_embeddings": get("context_length"),
            "tie_word_embeddings": "output.weight" not in self.file.tensors,
        }
        key_length = md.get("qwen2.attention.key_length")
        if key_length is not None:
            d["head_dim"] = key_length
        cfg = Qwen2Config.from_dict(d, source=self.path)
        rope_dims = md.get("qwen2.rope.dimension_count")
        if rope_dims is not None and rope_dims != cfg.head_dim:
            raise UnsupportedModelError(
                f"{self.path}: partial RoPE ({short_repr(rope_dims)} of {cfg.head_dim} dims) is not supported"
            )
        return cfg

    def evict(self, name: str) -> None:
        """Drop a tensor's mapped pages from resident memory (see SafetensorsFile.evict)."""
        self.file.evict(self.names[name])

    def remap_small_pages(self) -> None:
        """Nothing to do: a GGUF model's weights are made at load, and an untied embedding left in the
        file is read a row at a time (pread), not through the mapping."""
        return None

    def file_range(self, name: str) -> tuple[str, int]:
        """The file that holds a tensor, and the offset of its first byte there."""
        return self.file.file_range(self.names[name])

    def tensors(self, threads: int = 1) -> Iterator[tuple[str, np.ndarray, str, list[int]]]:
        """Block formats come as their bytes ("gguf:<type>"): set_tensor makes them float32 a chunk of
        rows at a time, in C++; the rest as views of the file."""
        for hf, name in self.names.items():
            array, kind = self.file.array(name, threads, raw_blocks=True)
            shape = list(self.file.tensors[name].numpy_shape)
            yield hf, array, kind, shape
            del array  # not held here while the next one is made


def open_checkpoint(path: str) -> HFCheckpoint | GGUFCheckpoint:
    """A folder is a Hugging Face checkpoint; a file starting with b"GGUF" is a GGUF file."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return HFCheckpoint(path)
    if not os.path.isfile(path):  # a pipe or a device would block the read below, or never end
        raise UnsupportedModelError(f"{path}: not a regular file or a folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelNotFoundError(f"{path}: cannot open ({e.strerror or e})") from None
    if magic == b"GGUF":
        return GGUFCheckpoint(path)
    raise UnsupportedModelError(f"{path}: neither a Hugging Face model folder nor a GGUF file")
