"""Small random Qwen2 checkpoints, saved by transformers, for tests that need no download."""

from __future__ import annotations

import json
import os
import struct

import torch

from tiny_tokenizer import write_tiny_tokenizer

# Shapes of the test models. "gqa" has Qwen2.5-0.5B's 7:1 head grouping; sizes are deliberately not
# multiples of 16 so that every kernel's tail path runs.
SHAPES = {
    "gqa": dict(hidden_size=84, num_attention_heads=14, num_key_value_heads=2, intermediate_size=200),
    "mha": dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=4, intermediate_size=172),
    # GGUF block formats need rows of 32 (Q8_0, Q5_0, Q4_0) or 256 (the K-quants) values
    "q32": dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=2, intermediate_size=160),
    "k256": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=512),
}


def make_checkpoint(
    folder,
    shape: str = "gqa",
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    shard: bool = False,
    layers: int = 3,
    seed: int = 0,
    max_position_embeddings: int = 512,
    generation_config: dict | None = None,
):
    """Writes a random Qwen2ForCausalLM with a tokenizer into `folder`; returns the torch model
    (float32, eval mode) holding exactly the weights written."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    os.makedirs(folder, exist_ok=True)
    vocab = write_tiny_tokenizer(folder)
    eos = [vocab - 1, vocab - 3]  # <|im_end|>, <|endoftext|>
    cfg = Qwen2Config(
        vocab_size=vocab + 5,  # like real Qwen checkpoints: a few ids past the tokenizer's
        num_hidden_layers=layers,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie,
        eos_token_id=eos,
        bos_token_id=vocab - 3,
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    # Default init (std 0.02, zero biases, unit norms) gives near-uniform logits and would leave the
    # biases and norms untested: draw everything at a scale where tokens are clearly told apart.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
        if dtype != torch.float32:
            # The file holds dtype; the reference model holds the same numbers in float32.
            for p in model.parameters():
                p.copy_(p.to(dtype).to(torch.float32))
    # Module.to() would also round the float32 RoPE buffer (inv_freq) to bf16: keep it aside.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to(dtype).save_pretrained(folder, max_shard_size="20KB" if shard else "10GB")
    model.to(torch.float32)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    if generation_config is not None:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": eos, **generation_config}, f)
    return model


# Hugging Face name -> GGUF name (the inverse of qwen2rt.checkpoint.gguf_to_hf_name).
def _gguf_name(hf: str) -> str:
    from qwen2rt.checkpoint import _GGUF_GLOBAL, _GGUF_LAYER

    for g, h in _GGUF_GLOBAL.items():
        if h == hf:
            return g
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}." + next(g for g, h in _GGUF_LAYER.items() if h == rest)


# The gguf package cannot quantize to the K formats, so K-quant test weights are random blocks:
# random bytes with the f16 super-block scales (byte offset, value) set so weights stay small.
K_QUANT_SCALES = {
    "Q4_K": (144, [(0, 2e-4), (2, 2e-4)]),  # d, dmin at the start of each 144-byte block
    "Q6_K": (210, [(208, 4e-5)]),  # d at the end of each 210-byte block
}


def random_k_blocks(shape, matrix_type: str, seed: int):
    import numpy as np

    block_bytes, scales = K_QUANT_SCALES[matrix_type]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset, value in scales:
        raw[:, :, offset : offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(path, model, tokenizer_folder, matrix_type: str = "F32", sampling: dict | None = None):
    """Writes `model` (a float32 Qwen2ForCausalLM) as a GGUF file the way llama.cpp lays one out:
    qwen2.* metadata, the tokenizer from `tokenizer_folder`, norms and biases in F32 and the weight
    matrices in `matrix_type` (F32, F16, BF16 or a block format such as Q8_0, quantized with the gguf
    package). A tied model has no output.weight. `sampling` (temp, top_k, ...) becomes general.sampling.*
    metadata. Returns the float32 weights the file holds (after
    quantization), by Hugging Face name."""
    import gguf
    import numpy as np

    from tiny_tokenizer import add_tokenizer_metadata, tiny_metadata

    c = model.config
    meta = tiny_metadata(tokenizer_folder)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    add_tokenizer_metadata(w, meta)
    for key, value in (sampling or {}).items():
        getattr(w, f"add_sampling_{key}")(value)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    held = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = p.detach().numpy().astype(np.float32)
        if a.ndim == 2 and matrix_type in K_QUANT_SCALES:
            data = random_k_blocks(a.shape, matrix_type, seed=len(held))
            w.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
            held[name] = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(a.shape)
        elif a.ndim == 2 and matrix_type != "F32":
            data = gguf.quants.quantize(a, qtype)
            w.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
            held[name] = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(a.shape)
        else:
            w.add_tensor(_gguf_name(name), a)
            held[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def edit_safetensors_header(path, fn):
    """Rewrites a safetensors file's JSON header through fn (which edits it in place or returns a new
    one), keeping the data (and its 64-byte alignment) as it was."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header = fn(header) or header
    new = json.dumps(header).encode()
    new += b" " * (-(8 + len(new)) % 64)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def unpack_bf16(packed, rows, cols):
    """A packed bf16 matrix (csrc/quant.h: groups of 32 rows, [row // 32][col // 2][row % 32][col % 2],
    columns padded to whole blocks of 32) back to row-major bf16 bits."""
    g, p = -(-rows // 32), -(-cols // 32) * 16
    return packed.reshape(g, p, 32, 2).transpose(0, 2, 1, 3).reshape(g * 32, p * 2)[:rows, :cols]
