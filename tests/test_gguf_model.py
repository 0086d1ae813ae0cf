"""Models read from GGUF files (written here from small random checkpoints) against PyTorch."""

import numpy as np
import pytest
import torch

import qwen2rt
from tiny_model import make_checkpoint, unpack_bf16, write_gguf

pytest.importorskip("gguf")

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(shape, tied) -> (float32 torch model, its folder), made on first use."""
    made = {}

    def get(shape, tied):
        if (shape, tied) not in made:
            folder = tmp_path_factory.mktemp(f"gguf-src-{shape}-{tied}")
            made[shape, tied] = make_checkpoint(folder, shape=shape, seed=4, tie=tied), folder
        return made[shape, tied]

    return get


def logits_with(model, weights, ids):
    """transformers' forward with the weights replaced by what the GGUF file holds."""
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    if model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    m = type(model)(model.config).eval()
    m.load_state_dict(state)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q6_K"])
def test_gguf_matches_pytorch(checkpoints, tmp_path, qtype, tied):
    model, folder = checkpoints("k256" if qtype.endswith("_K") else "q32", tied)
    path = tmp_path / f"m-{qtype}.gguf"
    held = write_gguf(path, model, folder, qtype)
    m = qwen2rt.Model(path, dtype="f32")
    assert m.config.tie_word_embeddings == tied
    ids = np.random.default_rng(1).integers(0, m.config.vocab_size, 40).tolist()
    want = logits_with(model, held, ids)
    got = m.forward(ids, all_logits=True)
    assert rel(got, want) < 1e-4, rel(got, want)


def test_gguf_tokenizer_and_generation(checkpoints, tmp_path):
    model, folder = checkpoints("q32", False)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, folder, "F32")
    g = qwen2rt.Model(path, dtype="f32")
    h = qwen2rt.Model(folder, dtype="f32")
    text = "def f(x):\n    return x * 2  # 两倍 😀"
    assert g.tokenize(text) == h.tokenize(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert g.apply_chat_template(msgs) == h.apply_chat_template(msgs)
    a = g.generate(msgs, max_new_tokens=20, temperature=0)
    b = h.generate(msgs, max_new_tokens=20, temperature=0)
    assert a.token_ids == b.token_ids and a.text == b.text


def test_gguf_tokenizer_read_at_load_and_its_lists_dropped(checkpoints, tmp_path):
    """A GGUF's weights are converted at load, so its tokenizer is read first (the parse's transient
    heap then does not add to the weights' peak RSS); the token and merge lists go once it is read."""
    from qwen2rt.checkpoint import open_checkpoint

    model, folder = checkpoints("q32", False)
    path = tmp_path / "m.gguf"
    write_gguf(path, model, folder, "F32")
    m = qwen2rt.Model(path, dtype="f32")
    assert m._tokenizer is not None and m._load_tokenizer is None
    ck = open_checkpoint(str(path))
    assert isinstance(ck.file.metadata["tokenizer.ggml.tokens"], list)
    tok = ck.load_tokenizer()
    lists = [k for k, v in ck.file.metadata.items() if k.startswith("tokenizer.ggml.") and isinstance(v, list)]
    assert lists == []
    assert tok.encode("def f(x): return 2") == m.tokenize("def f(x): return 2")


def test_gguf_sampling_defaults_from_metadata(checkpoints, tmp_path):
    """general.sampling.* keys (written by newer converters) become the generation defaults."""
    model, folder = checkpoints("q32", False)
    plain, tuned = tmp_path / "plain.gguf", tmp_path / "tuned.gguf"
    write_gguf(plain, model, folder, "F32")
    write_gguf(tuned, model, folder, "F32", sampling=dict(temp=0.6, top_k=30, top_p=0.9, penalty_repeat=1.1))
    assert "do_sample" not in qwen2rt.Model(plain).generation_config
    g = qwen2rt.Model(tuned).generation_config
    assert g["do_sample"] is True and g["top_k"] == 30
    assert abs(g["temperature"] - 0.6) < 1e-6 and abs(g["top_p"] - 0.9) < 1e-6
    assert abs(g["repetition_penalty"] - 1.1) < 1e-6


@pytest.mark.parametrize("dtype", ["q4", "q8", "bf16"])
def test_gguf_blocks_converted_by_rows_as_whole(checkpoints, tmp_path, dtype):
    """Block-format tensors reach set_tensor as their bytes and are made float32 256 rows at a time:
    the result is the packing (or rounding) of the whole dequantized matrix."""
    from qwen2rt import _core

    model, folder = checkpoints("q32", False)
    path = tmp_path / "m-Q5_0.gguf"
    held = write_gguf(path, model, folder, "Q5_0")
    m = qwen2rt.Model(path, dtype=dtype, dtype_overrides={"lm_head": dtype})  # q4 would keep it q6
    name = "lm_head.weight"  # vocab rows: several chunks, the last one short
    W = held[name].astype(np.float32)
    assert W.shape[0] > 256 and W.shape[0] % 256
    got_dtype, got, _, _ = m._core.tensor_bytes(name)
    assert got_dtype == dtype
    if dtype == "bf16":
        want = (np.ascontiguousarray(W).view(np.uint32) + 0x7FFF + ((W.view(np.uint32) >> 16) & 1)) >> 16
        got = unpack_bf16(got.view(np.uint16), *W.shape)  # held packed (csrc/quant.h)
        np.testing.assert_array_equal(got, want.astype(np.uint16))
    else:
        np.testing.assert_array_equal(got.ravel(), _core.kernels.quantize_weights(dtype, W, 1).ravel())


@pytest.mark.parametrize("dtype", ["q4", "bf16"])
def test_gguf_untied_embedding_read_from_its_blocks(checkpoints, tmp_path, dtype):
    """An untied embedding in a block format stays in the mapped file as it is, as in llama.cpp (only
    the rows of the tokens seen become resident), whatever the matrices' dtype; test_gguf_matches_pytorch
    checks its rows (f32, untied) against PyTorch."""
    from qwen2rt.gguf_io import GGUFFile

    model, folder = checkpoints("q32", False)
    path = tmp_path / "m-Q5_0.gguf"
    held = write_gguf(path, model, folder, "Q5_0")
    m = qwen2rt.Model(path, dtype=dtype)
    kind, got, rows, cols = m._core.tensor_bytes("model.embed_tokens.weight")
    assert kind == "gguf:6" and (rows, cols) == held["model.embed_tokens.weight"].shape
    assert got.tobytes() == GGUFFile(path).raw("token_embd.weight").tobytes() and not got.flags.writeable
    assert m._core.tensor_bytes("lm_head.weight")[0] in ("q6", dtype)  # the lm_head is a matmul's
    ids = [0, 1, rows - 1, 7, 7, 300 % rows]
    want = logits_with(model, held, ids)
    assert rel(m.forward(ids, all_logits=True), want) < {"bf16": 2e-2, "q4": 1.5e-1}[dtype]


@pytest.mark.parametrize("dtype", ["q4", "f32"])
def test_gguf_block_with_nan_scale_refused(checkpoints, tmp_path, dtype):
    """A NaN block scale in a Q8_0 tensor: refused at load, naming the tensor and the first bad value."""
    import re

    from qwen2rt.gguf_io import GGUFFile

    model, folder = checkpoints("q32", False)
    path = tmp_path / "m-Q8_0.gguf"
    write_gguf(path, model, folder, "Q8_0")
    f = GGUFFile(path)
    t = f.tensors["blk.1.ffn_up.weight"]
    cols = t.numpy_shape[1]
    row = 300 % t.numpy_shape[0]
    start = f.data_start + t.offset + row * (cols // 32) * 34 + 34  # Q8_0: 34-byte blocks; the row's second
    del f
    raw = bytearray(path.read_bytes())
    raw[start : start + 2] = b"\x00\x7e"  # f16 NaN
    path.write_bytes(bytes(raw))
    name = "model.layers.1.mlp.up_proj.weight"
    problem = f"{name}' holds NaN or Inf (first at row {row}, column 32)"
    with pytest.raises(qwen2rt.FormatError, match=re.escape(problem)):
        qwen2rt.Model(path, dtype=dtype)
