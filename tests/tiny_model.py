"""Small random Qwen2 checkpoints, saved by transformers, for tests that need no download."""

from __future__ import annotations

import json
import os

import torch

from tiny_tokenizer import write_tiny_tokenizer

# Shapes of the test models. "gqa" has Qwen2.5-0.5B's 7:1 head grouping; sizes are deliberately not
# multiples of 16 so that every kernel's tail path runs.
SHAPES = {
    "gqa": dict(hidden_size=84, num_attention_heads=14, num_key_value_heads=2, intermediate_size=200),
    "mha": dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=4, intermediate_size=172),
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
