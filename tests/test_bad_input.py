"""Bad input gets a qwen2rt exception that names the problem: never a crash or silent garbage."""

import json
import os
import shutil
import signal
import struct
import threading
import time

import numpy as np
import pytest

import qwen2rt
from qwen2rt import (
    ContextLengthError,
    FormatError,
    InvalidInputError,
    ModelNotFoundError,
    OutOfMemoryError,
    UnsupportedModelError,
)
from tiny_model import edit_safetensors_header, make_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    f = tmp_path_factory.mktemp("good")
    make_checkpoint(f, shape="mha", max_position_embeddings=64)
    return f


@pytest.fixture
def copy(good, tmp_path):
    """A fresh copy of the good checkpoint to break."""
    dst = tmp_path / "m"
    shutil.copytree(good, dst)
    return dst


@pytest.fixture(scope="module")
def model(good):
    return qwen2rt.Model(good, dtype="f32")


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


# -- missing and unsupported models ------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no-such"):
        qwen2rt.Model(tmp_path / "no-such")


def test_missing_config(copy):
    os.remove(copy / "config.json")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        qwen2rt.Model(copy)


def test_missing_weights(copy):
    os.remove(copy / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        qwen2rt.Model(copy)


def test_missing_tokenizer(copy):
    os.remove(copy / "tokenizer.json")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json"):
        qwen2rt.Model(copy)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(model_type="llama"), "not a Qwen2 model"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}), "dynamic"),
        (dict(use_sliding_window=True, sliding_window=64), "sliding"),
        (dict(layer_types=["sliding_attention"] * 3), "sliding"),
        (dict(hidden_act="gelu"), "gelu"),
    ],
)
def test_unsupported_config(copy, changes, match):
    edit_config(copy, **changes)
    with pytest.raises(UnsupportedModelError, match=match):
        qwen2rt.Model(copy)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(hidden_size=None), "hidden_size"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
        (dict(vocab_size="many"), "vocab_size"),
        (dict(rms_norm_eps=-1), "rms_norm_eps"),
    ],
)
def test_malformed_config(copy, changes, match):
    edit_config(copy, **changes)
    with pytest.raises(FormatError, match=match):
        qwen2rt.Model(copy)


def test_config_not_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match="config.json"):
        qwen2rt.Model(copy)


def test_config_disagrees_with_weights(copy):
    edit_config(copy, intermediate_size=100)
    with pytest.raises(FormatError, match="shape"):
        qwen2rt.Model(copy)


# -- broken safetensors ------------------------------------------------------------------------


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("keep", [0, 5, 100, -1000])
def test_truncated_safetensors(copy, keep):
    p = copy / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    with pytest.raises(FormatError, match="model.safetensors"):
        qwen2rt.Model(copy)


def test_header_longer_than_file(copy):
    p = copy / "model.safetensors"
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", len(raw) * 10) + raw[8:])
    with pytest.raises(FormatError, match="past the end"):
        qwen2rt.Model(copy)


def test_huge_header_length(copy):
    p = copy / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(FormatError, match="header length"):
        qwen2rt.Model(copy)


def test_header_not_json(copy):
    p = copy / "model.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    p.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n :])
    with pytest.raises(FormatError, match="JSON"):
        qwen2rt.Model(copy)


def test_offsets_past_end(copy):
    def f(h):
        k = first_tensor(h)
        b, e = h[k]["data_offsets"]
        h[k]["data_offsets"] = [b + 10**9, e + 10**9]
        return h

    edit_safetensors_header(copy / "model.safetensors", f)
    with pytest.raises(FormatError):
        qwen2rt.Model(copy)


def test_overlapping_offsets(copy):
    def f(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = names[0], names[1]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
        return h

    edit_safetensors_header(copy / "model.safetensors", f)
    with pytest.raises(FormatError, match="overlaps|gap"):
        qwen2rt.Model(copy)


def test_shape_does_not_match_span(copy):
    def f(h):
        k = first_tensor(h)
        h[k]["shape"] = [s * 2 for s in h[k]["shape"]]
        return h

    edit_safetensors_header(copy / "model.safetensors", f)
    with pytest.raises(FormatError, match="bytes but data_offsets span"):
        qwen2rt.Model(copy)


def test_unknown_dtype(copy):
    def f(h):
        h[first_tensor(h)]["dtype"] = "Q4_WHAT"
        return h

    edit_safetensors_header(copy / "model.safetensors", f)
    with pytest.raises(FormatError, match="unknown dtype"):
        qwen2rt.Model(copy)


def test_missing_tensor_is_named(copy):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        qwen2rt.Model(copy)


def test_unexpected_tensor(copy):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(72, np.float32)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(FormatError, match="o_proj.bias"):
        qwen2rt.Model(copy)


def test_integer_weights_refused(copy):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="I32"):
        qwen2rt.Model(copy)


def test_shard_index_path_traversal(copy):
    from safetensors.numpy import load_file

    names = list(load_file(copy / "model.safetensors"))
    index = {"weight_map": {n: "../../etc/passwd" for n in names}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FormatError, match="not a file name"):
        qwen2rt.Model(copy)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8", "q4"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name, index, where", [
    ("model.layers.1.mlp.up_proj.weight", (5, 7), "row 5, column 7"),
    ("model.layers.0.input_layernorm.weight", (3,), "element 3"),
])
def test_non_finite_weights_refused_at_load(copy, dtype, value, name, index, where):
    """A NaN or Inf anywhere in the weights is refused at load, naming the tensor and the place,
    whatever the dtype the model is held in (the source values are checked, before rounding or
    quantization could hide or spread them)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(copy / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(FormatError, match=rf"{name.replace('.', '[.]')}' holds NaN or Inf \(first at {where}"):
        qwen2rt.Model(copy, dtype=dtype)


@pytest.mark.parametrize("dtype", ["q8", "q6", "q4"])
def test_non_finite_scale_in_converted_model_refused(good, tmp_path, dtype):
    """A converted (packed) model with an Inf block scale: refused at load, naming the tensor."""
    from qwen2rt.converted import convert

    out = tmp_path / dtype
    convert(good, out, dtype=dtype)
    st = out / "model.safetensors"
    raw = bytearray(st.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = "model.layers.1.mlp.down_proj.weight"
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start + 2 : start + 4] = struct.pack("<H", 0x7C00)  # the second row's scale of block 0: +Inf
    st.write_bytes(bytes(raw))
    where = r"first at a scale of rows 0..15"
    with pytest.raises(FormatError, match=rf"{name.replace('.', '[.]')}' holds NaN or Inf \({where}"):
        qwen2rt.Model(out)


@pytest.mark.parametrize("row, col", [(5, 7), (13, 40), (70, 171)])
def test_non_finite_in_converted_bf16_refused(good, tmp_path, row, col):
    """A converted bf16 model (packed: groups of 32 rows by column pairs, csrc/quant.h) with a NaN:
    refused at load, naming the row and column it has in the matrix."""
    from qwen2rt.converted import convert

    out = tmp_path / "bf16"
    convert(good, out, dtype="bf16")
    st = out / "model.safetensors"
    raw = bytearray(st.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = "model.layers.1.mlp.down_proj.weight"
    cols = json.loads(header["__metadata__"]["qwen2rt_shapes"])[name][1]
    index = (row // 32) * 32 * (-(-cols // 32) * 32) + ((col // 2) * 32 + row % 32) * 2 + col % 2
    start = 8 + n + header[name]["data_offsets"][0] + 2 * index
    raw[start : start + 2] = struct.pack("<H", 0x7FC0)  # bf16 NaN
    st.write_bytes(bytes(raw))
    where = rf"first at row {row}, column {col}\)"
    with pytest.raises(FormatError, match=rf"{name.replace('.', '[.]')}' holds NaN or Inf \({where}"):
        qwen2rt.Model(out)


# -- bad arguments -----------------------------------------------------------------------------

def test_bad_dtype(good):
    with pytest.raises(InvalidInputError, match="dtype"):
        qwen2rt.Model(good, dtype="int3")


@pytest.mark.parametrize("ids", [[1, 2, -1], [1, 10**6], [2**31 + 5]])
def test_token_out_of_range(model, ids):
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        model.forward(ids)
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        model.generate(ids, max_new_tokens=2)


def test_not_token_ids(model):
    with pytest.raises(InvalidInputError):
        model.forward([1.5, 2.0])
    with pytest.raises(InvalidInputError):
        model.forward([])
    with pytest.raises(InvalidInputError):
        model.forward("text")


def test_start_pos_past_cache(model):
    model.reset()
    model.forward([1, 2, 3])
    with pytest.raises(InvalidInputError, match="start_pos"):
        model.forward([4], start_pos=5)


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(top_k=-3), dict(repetition_penalty=0),
     dict(max_new_tokens=-1), dict(stop=[3])],
)
def test_bad_generation_arguments(model, kw):
    with pytest.raises(InvalidInputError):
        model.generate([1, 2, 3], **kw)


def test_prompt_longer_than_context(good):
    m = qwen2rt.Model(good, dtype="f32", max_context=16)
    with pytest.raises(ContextLengthError, match="max_context=16"):
        m.generate(list(range(1, 18)), max_new_tokens=1)
    with pytest.raises(ContextLengthError):
        m.forward(list(range(1, 18)))
    # exactly max_context works, and generation stops when the context is full
    logits = m.forward(list(range(1, 17)))
    assert logits.shape == (m.config.vocab_size,)
    r = m.generate(list(range(1, 17)), max_new_tokens=5, temperature=0)
    assert r.completion_tokens <= 1 and r.finish_reason in ("length", "stop")
    r = m.generate(list(range(1, 10)), max_new_tokens=50, temperature=0)
    assert r.prompt_tokens + r.completion_tokens <= 17


def test_kv_cache_that_does_not_fit(good, monkeypatch):
    import qwen2rt.model

    monkeypatch.setattr(qwen2rt.model, "available_memory", lambda: 1 << 20)
    with pytest.raises(OutOfMemoryError, match="max_context"):
        qwen2rt.Model(good, max_context=1 << 20)


def test_bad_max_context_and_threads(good):
    with pytest.raises(InvalidInputError):
        qwen2rt.Model(good, max_context=0)
    with pytest.raises(InvalidInputError):
        qwen2rt.Model(good, threads=0)


def test_model_still_works_after_errors(model, good):
    from transformers import Qwen2ForCausalLM
    import torch

    ref = Qwen2ForCausalLM.from_pretrained(good, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([[5, 6, 7]])).logits[0, -1].numpy()
    with pytest.raises(InvalidInputError):
        model.forward([5, 6, 10**7])
    got = model.forward([5, 6, 7])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


# -- Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_during_prefill(tmp_path):
    """KeyboardInterrupt during a long prefill returns quickly and leaves the model usable."""
    from safetensors.numpy import save_file
    from tiny_tokenizer import write_tiny_tokenizer

    vocab = write_tiny_tokenizer(tmp_path)
    H, I, L = 512, 1536, 8
    KV = 2 * H // 8  # 2 KV heads of head_dim H / 8
    cfg = dict(model_type="qwen2", vocab_size=vocab, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": rng.standard_normal((vocab, H), np.float32),
         "model.norm.weight": np.ones(H, np.float32)}
    for i in range(L):
        p = f"model.layers.{i}."
        for name, shape in [("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (KV, H)), ("self_attn.v_proj", (KV, H)),
                            ("self_attn.o_proj", (H, H)), ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)),
                            ("mlp.down_proj", (H, I))]:
            t[p + name + ".weight"] = (rng.standard_normal(shape, np.float32) / np.sqrt(shape[1])).astype(np.float32)
        for name, n in [("self_attn.q_proj", H), ("self_attn.k_proj", KV), ("self_attn.v_proj", KV)]:
            t[p + name + ".bias"] = np.zeros(n, np.float32)
        t[p + "input_layernorm.weight"] = np.ones(H, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(H, np.float32)
    save_file(t, tmp_path / "model.safetensors")
    m = qwen2rt.Model(tmp_path, dtype="f32")
    ids = rng.integers(0, vocab, 4000).tolist()

    t0 = time.perf_counter()
    m.forward(ids[:512])
    per_token = (time.perf_counter() - t0) / 512
    m.reset()
    print(f"prefill of 4000 tokens: about {per_token * 4000:.2f} s")
    if per_token * 4000 < 0.5:
        pytest.skip("prefill too fast on this machine to interrupt reliably")

    timer = threading.Timer(0.2, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        m.forward(ids)
    elapsed = time.perf_counter() - t0
    timer.join()
    assert elapsed < 0.2 + per_token * 4000 * 0.9, elapsed  # it did not run to the end
    assert m.cache_len % qwen2rt._core.CHUNK_TOKENS == 0 and m.cache_len < 4000  # whole chunks only
    # usable afterwards, and the kept prefix is valid
    n = m.cache_len
    got = m.forward(ids[n : n + 8], start_pos=n)
    m.reset()
    want = m.forward(ids[: n + 8])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())

    # during decode: generations run back to back until the signal; it ends the current one at once
    fired = []

    def fire():
        fired.append(time.perf_counter())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    timer = threading.Timer(0.5, fire)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        while True:
            m.generate(ids[:16], max_new_tokens=200, temperature=0)
    latency = time.perf_counter() - fired[0]
    timer.join()
    assert latency < 1.0, latency  # the loop would otherwise never end
    assert m.generate(ids[:16], max_new_tokens=3, temperature=0).prompt_tokens == 16  # usable, not busy


def test_allocation_failure_in_the_core_is_out_of_memory_error():
    """A cache the address space cannot hold, asked of the C++ core directly (past Model's own
    check): qwen2rt.OutOfMemoryError with the bytes asked for, not a crash."""
    from qwen2rt import _core

    cfg = dict(vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=4096, num_attention_heads=1024,
               num_key_value_heads=1024, head_dim=1024, rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True)
    with pytest.raises(OutOfMemoryError, match=r"could not allocate \d+ bytes"):
        _core.Qwen2Model(cfg, "f32", 1, 1 << 24, "f16")
