"""Model files on disk: a Hugging Face folder or a GGUF file, seen the same way by Model.

A checkpoint gives the config, the generation defaults, the tokenizer, and the weights as
(Hugging Face tensor name, numpy array, dtype, logical shape) — mapped from the file where the bytes
can be used as they are, dequantized to float32 where they are a GGUF block format. A converted
qwen2rt folder (converted.py) is a Hugging Face folder whose safetensors hold packed q8/q4 bytes.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import numpy as np

from .config import Qwen2Config, read_json
from .converted import ConvertedWeights, is_converted
from .errors import FormatError, ModelNotFoundError, UnsupportedModelError
from .safetensors_io import DTYPES, SafetensorsFile
from .tokenizer import Tokenizer

# Tensors some checkpoints carry that the model recomputes itself.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


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
            if not isinstance(gc, dict):
                raise FormatError(f"{gen_path}: expected a JSON object")
            self.generation_config = gc
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
                if not isinstance(fname, str) or os.path.basename(fname) != fname or fname in ("", ".", ".."):
                    raise FormatError(f"{index}: shard name {fname!r} for {name!r} is not a file name in the folder")
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
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")

# Tokens that end a turn besides the file's eos id, as Qwen2 instruct models' generation_config lists.
_END_OF_TURN = ("<|endoftext|>", "<|im_end|>")


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = _GGUF_BLOCK.fullmatch(name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{int(m.group(1))}.{_GGUF_LAYER[m.group(2)]}"
    return None


class GGUFCheckpoint:
    """A GGUF file (llama.cpp's format): config from the qwen2.* metadata, the tokenizer and chat
    template from tokenizer.* metadata, block-format weights dequantized to float32 at load."""

    converted = None  # never a converted qwen2rt model

    def __init__(self, path: str):
        from .gguf_io import GGUFFile
        from .gguf_tokenizer import tokenizer_from_gguf

        self.path = path
        self.file = GGUFFile(path)
        md = self.file.metadata
        self.config = self._config(md)
        self.load_tokenizer = lambda: tokenizer_from_gguf(md, source=path)  # on first use
        eos = [md["tokenizer.ggml.eos_token_id"]] if isinstance(md.get("tokenizer.ggml.eos_token_id"), int) else []
        tokens = md.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            eos += [i for i, t in enumerate(tokens) if t in _END_OF_TURN]
        self.generation_config: dict[str, Any] = {"eos_token_id": sorted(set(eos)), **self._sampling(md)}
        names = {}
        for name in self.file.tensors:
            hf = gguf_to_hf_name(name)
            if hf is None:
                raise UnsupportedModelError(f"{path}: unexpected tensor {name!r} for a qwen2 model")
            names[hf] = name
        self.names = names

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

        def get(key: str, default: Any = None) -> Any:
            v = md.get(f"qwen2.{key}", default)
            if v is None:
                raise FormatError(f"{self.path}: metadata qwen2.{key} is missing")
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
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
            "rope_theta": get("rope.freq_base", 10000.0),
            "max_position_embeddings": get("context_length"),
            "tie_word_embeddings": "output.weight" not in self.file.tensors,
        }
        key_length = md.get("qwen2.attention.key_length")
        if key_length is not None:
            d["head_dim"] = key_length
        cfg = Qwen2Config.from_dict(d, source=self.path)
        rope_dims = md.get("qwen2.rope.dimension_count")
        if rope_dims is not None and rope_dims != cfg.head_dim:
            raise UnsupportedModelError(f"{self.path}: partial RoPE ({rope_dims} of {cfg.head_dim} dims) is not supported")
        return cfg

    def tensors(self, threads: int = 1) -> Iterator[tuple[str, np.ndarray, str, list[int]]]:
        """Block formats are dequantized in C++ on `threads` threads, one tensor at a time."""
        for hf, name in self.names.items():
            array, kind = self.file.array(name, threads)
            yield hf, array, kind, list(array.shape)


def open_checkpoint(path: str) -> HFCheckpoint | GGUFCheckpoint:
    """A folder is a Hugging Face checkpoint; a file starting with b"GGUF" is a GGUF file."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return HFCheckpoint(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelNotFoundError(f"{path}: cannot open ({e.strerror or e})") from None
    if magic == b"GGUF":
        return GGUFCheckpoint(path)
    raise UnsupportedModelError(f"{path}: neither a Hugging Face model folder nor a GGUF file")
