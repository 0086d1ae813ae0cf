"""The C++ forward pass against transformers' Qwen2ForCausalLM on small random checkpoints."""

import numpy as np
import pytest
import torch

import qwen2rt
from qwen2rt import _core
from isa_paths import TILE_ISAS_HERE, logits_per_isa
from qwen2rt.model import BF16_DOT_ISAS
from tiny_model import make_checkpoint

# (shape, tied embeddings, file dtype, sharded safetensors)
CASES = {
    "gqa-f32": ("gqa", False, torch.float32, False),
    "gqa-tied-sharded": ("gqa", True, torch.float32, True),
    "gqa-bf16-sharded": ("gqa", False, torch.bfloat16, True),
    "mha-f32": ("mha", False, torch.float32, False),
    "mha-tied-bf16": ("mha", True, torch.bfloat16, False),
}


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    shape, tie, dtype, shard = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(folder, shape=shape, tie=tie, dtype=dtype, shard=shard)
    return folder, ref, dtype


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def reference_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


def test_checkpoint_layout(checkpoint):
    folder, ref, dtype = checkpoint
    sharded = (folder / "model.safetensors.index.json").exists()
    assert sharded or (folder / "model.safetensors").exists()


def test_prefill_then_decode_matches_transformers(checkpoint, isa):
    """Prefill of 45 tokens, then 12 decode steps through the KV cache: every logit row within 1e-4
    (relative to the largest logit) of transformers' float32 logits."""
    folder, ref, file_dtype = checkpoint
    # f32 weights; a bf16 file also runs as bf16 in memory: the same numbers, computed in f32 (with
    # an f32 KV cache here: the f16 cache is checked on its own below). The AVX-512 bf16 prefill
    # rounds its tokens to bf16 (kernels_avx512.cpp matmul_bf16_dot): 5e-3 off on these random models,
    # where rounding the weights to bf16 moves the logits by 4e-3; tests/test_kernels.py checks it
    # to 1e-5 against the rounded tokens.
    dtypes = ["f32"] + (["bf16"] if file_dtype == torch.bfloat16 else [])
    rng = np.random.default_rng(7)
    ids = rng.integers(0, ref.config.vocab_size, 57).tolist()
    want = reference_logits(ref, ids)
    for dtype in dtypes:
        m = qwen2rt.Model(folder, dtype=dtype, max_context=128, kv_dtype="f32")
        rows = [m.forward(ids[:45], all_logits=True)]
        for i in range(45, 57):
            rows.append(m.forward([ids[i]], start_pos=i)[None])
        got = np.concatenate(rows)
        assert got.shape == want.shape
        tol = 1e-2 if dtype == "bf16" and isa in BF16_DOT_ISAS else 1e-4
        assert rel_err(got, want) < tol, (dtype, rel_err(got, want))
        assert m.cache_len == 57


def test_16bit_kv_caches(checkpoint, isa):
    """The f16 cache (the default for bf16/q8/q4 weights) rounds keys and values to 11 significant
    bits, the bf16 cache to 8 (and q to bf16 for the scores): close to the f32 cache, through prefill
    and decode, and not identical to it."""
    folder, ref, _ = checkpoint
    rng = np.random.default_rng(9)
    ids = rng.integers(0, ref.config.vocab_size, 40).tolist()
    out = {}
    for kv in ("f32", "f16", "bf16"):
        m = qwen2rt.Model(folder, dtype="f32", max_context=64, kv_dtype=kv)
        assert m.info()["kv_dtype"] == kv
        rows = [m.forward(ids[:30], all_logits=True)]
        for i in range(30, 40):
            rows.append(m.forward([ids[i]], start_pos=i)[None])
        out[kv] = np.concatenate(rows)
    err = rel_err(out["f16"], out["f32"])
    assert 0 < err < 2e-3, err
    err = rel_err(out["bf16"], out["f32"])  # measured 1.4e-3 to 2.5e-3 (f16: 1.5e-4 to 2.9e-4)
    assert 0 < err < 5e-3, err


@pytest.mark.parametrize("tiles", TILE_ISAS_HERE)
def test_amx_bf16_prefill_matches_avx512(checkpoint, tiles):
    """The bf16 prefill on AMX tiles (or their emulation, kernels_amx.cpp), with the weight rows
    split across 2 threads: the products the AVX-512 prefill takes, summed in another order. A last
    bit of difference can move one activation across a bf16 rounding boundary, and every later row
    attends to that one (measured on the emulation: rows 0-8 within 5e-7 of AVX-512, later ones 1e-3
    to 3e-3; where the first one falls depends on the order of the sums), so the bound is the bf16
    one, as for AVX-512 against transformers; a wrong tile is off by O(1)."""
    folder, ref, file_dtype = checkpoint
    if file_dtype != torch.bfloat16:
        pytest.skip("bf16 file")
    ids = np.random.default_rng(11).integers(0, ref.config.vocab_size, 45).tolist()
    want = reference_logits(ref, ids)
    out = logits_per_isa(
        ("avx512", tiles), lambda: qwen2rt.Model(folder, dtype="bf16", threads=2, kv_dtype="f32"), ids
    )
    assert rel_err(out[tiles], out["avx512"]) < 1e-2
    assert rel_err(out[tiles], want) < 1e-2


def test_kv_dtype_defaults_and_choices(checkpoint):
    folder, _, _ = checkpoint
    assert qwen2rt.Model(folder, dtype="f32", max_context=8).info()["kv_dtype"] == "f32"
    bf = qwen2rt.Model(folder, dtype="bf16", max_context=8).info()
    assert bf["kv_dtype"] == "f16"
    with pytest.raises(qwen2rt.InvalidInputError, match="kv_dtype"):
        qwen2rt.Model(folder, kv_dtype="q8", max_context=8)
    assert qwen2rt.Model(folder, dtype="bf16", kv_dtype="bf16", max_context=8).info()["kv_dtype"] == "bf16"
    # q4 takes a bf16 cache where the kernels have bf16 dot products faster than FMAs
    fast = _core.cpu_flags()["fast_bf16_dot"]
    want = "bf16" if _core.active_isa() in BF16_DOT_ISAS and fast else "f16"
    assert qwen2rt.Model(folder, dtype="q4", max_context=8).info()["kv_dtype"] == want


def test_long_prompt_in_chunks(checkpoint):
    """A prompt longer than one chunk (qwen2.h kChunk): chunks attend to the ones before them."""
    folder, ref, _ = checkpoint
    rng = np.random.default_rng(8)
    n = _core.CHUNK_TOKENS + 44
    ids = rng.integers(0, ref.config.vocab_size, n).tolist()
    want = reference_logits(ref, ids)
    m = qwen2rt.Model(folder, dtype="f32", max_context=n)  # past the tiny config's 512 positions
    got = m.forward(ids, all_logits=True)
    assert rel_err(got, want) < 1e-4
    last = m.forward(ids[: n - 1] + [ids[n - 1]], start_pos=0)
    assert rel_err(last, want[-1]) < 1e-4


def test_bf16_weights_from_f32_file(checkpoint):
    """dtype='bf16' rounds f32 weights: close to, not equal to, the f32 model."""
    folder, ref, file_dtype = checkpoint
    if file_dtype != torch.float32:
        pytest.skip("the file is already bf16")
    ids = np.random.default_rng(9).integers(0, ref.config.vocab_size, 40).tolist()
    want = reference_logits(ref, ids)
    got = qwen2rt.Model(folder, dtype="bf16").forward(ids, all_logits=True)
    assert rel_err(got, want) < 3e-2
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_greedy_generation_matches_transformers(checkpoint, isa):
    folder, ref, _ = checkpoint
    prompt = np.random.default_rng(10).integers(0, ref.config.vocab_size - 10, 20).tolist()
    eos = list(ref.config.eos_token_id)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )[0, len(prompt) :].tolist()
    if out and out[-1] in eos:
        out = out[:-1]
    m = qwen2rt.Model(folder, dtype="f32")
    r = m.generate(prompt, max_new_tokens=32, temperature=0)
    assert r.token_ids == out
    assert r.finish_reason == ("length" if len(out) == 32 else "stop")


def test_rewinding_start_pos_reuses_the_prefix(checkpoint):
    folder, ref, _ = checkpoint
    ids = np.random.default_rng(11).integers(0, ref.config.vocab_size, 30).tolist()
    other = np.random.default_rng(12).integers(0, ref.config.vocab_size, 10).tolist()
    m = qwen2rt.Model(folder, dtype="f32")
    m.forward(ids[:20] + other)  # cache a different continuation
    got = m.forward(ids[20:], start_pos=20, all_logits=True)  # overwrite it from position 20
    want = reference_logits(ref, ids)[20:]
    assert rel_err(got, want) < 1e-4
    assert m.cache_len == 30
    m.reset()
    assert m.cache_len == 0


@pytest.mark.parametrize("shape,threads", [("gqa", 2), ("gqa", 5), ("mha", 6)])
def test_split_kv_decode_matches_transformers(tmp_path, isa, shape, threads):
    """Decode at a long context on more threads than KV heads cuts each head's keys into ranges
    (split-KV) and merges their outputs by log-sum-exp: the logits stay those of transformers and
    of one thread (no split), with the f32, f16 and bf16 caches."""
    ref = make_checkpoint(tmp_path, shape=shape, layers=2, max_position_embeddings=2048)
    rng = np.random.default_rng(13)
    ids = rng.integers(0, ref.config.vocab_size, 1100).tolist()
    want = reference_logits(ref, ids)
    for kv in ("f32", "f16", "bf16"):
        rows = {}
        for th in (1, threads):
            m = qwen2rt.Model(tmp_path, dtype="f32", threads=th, max_context=1200, kv_dtype=kv)
            m.forward(ids[:1090])
            rows[th] = np.stack([m.forward([ids[i]], start_pos=i) for i in range(1090, 1100)])
        tol = {"f32": 1e-4, "f16": 3e-3, "bf16": 3e-3}[kv]  # bf16 measured 8.2e-4
        assert rel_err(rows[threads], want[1090:]) < tol, (kv, rel_err(rows[threads], want[1090:]))
        assert rel_err(rows[threads], rows[1]) < (1e-5 if kv == "f32" else 1e-4)


def test_kv_cache_in_huge_pages_keeps_its_values(tmp_path):
    """Past 8192 positions of a 16384-position cache, most of its 2 MiB pages are half written and are
    collapsed into huge pages (KVCache::settle; where the kernel can). The cache reads the same after:
    the last position, computed again as a decode step over the collapsed cache, matches the prompt's
    own last row."""
    import re

    make_checkpoint(tmp_path, shape="k256", seed=23, layers=2)
    m = qwen2rt.Model(tmp_path, dtype="f32", max_context=16384, threads=2)
    ids = np.random.default_rng(9).integers(0, m.config.vocab_size, 8800).tolist()

    def huge_kb():
        try:
            return int(re.search(r"AnonHugePages:\s+(\d+)", open("/proc/self/smaps_rollup").read()).group(1))
        except (OSError, AttributeError):
            return None

    before = huge_kb()
    last = m.forward(ids)
    after = huge_kb()
    again = m.forward(ids[-1:], start_pos=len(ids) - 1)
    np.testing.assert_allclose(again, last, rtol=0, atol=1e-5 * np.abs(last).max())
    print(f"\nAnonHugePages {before} -> {after} kB")
