"""Every kernel of every ISA path this machine has, against a float64 numpy reference, on odd sizes."""

import numpy as np
import pytest

import qwen2rt
from qwen2rt import _core
from isa_paths import ALL_ISAS_HERE
from qwen2rt.model import BF16_DOT_ISAS

ISAS = _core.available_isas()
rng = np.random.default_rng(1234)


def bf16_bits(a):
    """float32 -> bf16 bit patterns (round to nearest even), and the float32 values they hold."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def close(got, want, rtol=1e-5):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 5, 17, 33, 70])
@pytest.mark.parametrize("K", [1, 7, 16, 17, 33, 100])
@pytest.mark.parametrize("N", [1, 3, 9, 17])
def test_matmul_f32(isa, M, K, N):
    X = rng.standard_normal((M, K)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    want = X.astype(np.float64) @ W.T.astype(np.float64)
    close(_core.kernels.matmul(isa, X, W), want)
    close(_core.kernels.matmul(isa, X, W, b), want + b)


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)  # the emulated AMX tiles too
@pytest.mark.parametrize("M", [1, 3, 5, 16, 17, 33, 40])
@pytest.mark.parametrize("K", [1, 15, 16, 33, 130])
@pytest.mark.parametrize("N", [1, 4, 11, 21])
def test_matmul_bf16(isa, M, K, N):
    X = rng.standard_normal((M, K)).astype(np.float32)
    bits, Wf = bf16_bits(rng.standard_normal((N, K)))
    b = rng.standard_normal(N).astype(np.float32)
    want = bf16_tokens(isa, M, X).astype(np.float64) @ Wf.T.astype(np.float64) + b
    close(_core.kernels.matmul(isa, X, bits, b), want)


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)
@pytest.mark.parametrize("M", [1, 5, 40])
@pytest.mark.parametrize("n0,n1", [(16, 50), (16, 20), (32, 50), (48, 49)])
def test_matmul_bf16_rows_from_half_a_group(isa, M, n0, n1):
    # a thread's rows start on any multiple of 16: half way into a packed group of 32 rows too
    K, N = 70, 50
    X = rng.standard_normal((M, K)).astype(np.float32)
    bits, Wf = bf16_bits(rng.standard_normal((N, K)))
    b = rng.standard_normal(N).astype(np.float32)
    want = np.zeros((M, N))
    want[:, n0:n1] = (bf16_tokens(isa, M, X).astype(np.float64) @ Wf.T.astype(np.float64) + b)[:, n0:n1]
    close(_core.kernels.matmul(isa, X, bits, b, n0, n1), want)
    with pytest.raises(qwen2rt.InvalidInputError, match="multiple of 16"):
        _core.kernels.matmul(isa, X, bits, b, 8, n1)


def bf16_tokens(isa, M, X):
    """X as the bf16 matmul multiplies it: the AVX-512 prefill (M > 1) rounds the tokens to bf16 and
    sums exact products in f32, as do the AMX tiles (M >= 16); every other path multiplies the f32
    tokens."""
    return bf16_bits(X)[1] if isa in BF16_DOT_ISAS and M > 1 else X


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)  # the emulated AMX tiles too
def test_matmul_bf16_large(isa):
    # more tokens than one 64-token block (and than ten 12-token panels, the last part-filled), rows in
    # several packed groups and 32-row panels with a part-filled last one
    X = rng.standard_normal((130, 300)).astype(np.float32)
    bits, Wf = bf16_bits(rng.standard_normal((75, 300)))
    want = bf16_tokens(isa, 130, X).astype(np.float64) @ Wf.T.astype(np.float64)
    close(_core.kernels.matmul(isa, X, bits), want)


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)
@pytest.mark.parametrize("M", [1, 2, 12, 13, 40])
@pytest.mark.parametrize("K,N,n0,n1", [(33, 50, 0, 50), (70, 50, 16, 50), (130, 96, 32, 80), (896, 64, 0, 64)])
def test_matmul_bf16_swiglu(isa, M, K, N, n0, n1):
    # silu(X gate^T) * (X up^T) in one kernel: tokens in part-filled 12-token panels, rows from half
    # way into a packed group of 32, gate values far into both tails of silu; zeros outside [n0, n1)
    if not _core.kernels.has_bf16_swiglu(isa):
        assert isa != "avx512", "the AVX-512 table fuses the MLP's bf16 products"
        with pytest.raises(qwen2rt.InvalidInputError, match="no fused"):
            _core.kernels.matmul_bf16_swiglu(
                isa, np.zeros((1, K), np.float32), np.zeros((N, K), np.uint16), np.zeros((N, K), np.uint16)
            )
        return
    X = rng.standard_normal((M, K)).astype(np.float32)
    g_bits, Wg = bf16_bits(rng.standard_normal((N, K)) * 8 / np.sqrt(K))  # gate values out to +-30
    u_bits, Wu = bf16_bits(rng.standard_normal((N, K)))
    Xt = bf16_tokens(isa, M, X).astype(np.float64)
    g, u = Xt @ Wg.T.astype(np.float64), Xt @ Wu.T.astype(np.float64)
    want = np.zeros((M, N))
    want[:, n0:n1] = (g / (1 + np.exp(-g)) * u)[:, n0:n1]
    close(_core.kernels.matmul_bf16_swiglu(isa, X, g_bits, u_bits, n0, n1), want, rtol=1e-5)
    # the model's unfused path (two products and silu_mul) gives the same sums
    unfused = _core.kernels.matmul(isa, X, g_bits), _core.kernels.matmul(isa, X, u_bits)
    h = np.zeros((M, N), np.float32)
    for m in range(M):
        h[m, n0:n1] = _core.kernels.silu_mul(isa, unfused[0][m, n0:n1], unfused[1][m, n0:n1])
    np.testing.assert_array_equal(_core.kernels.matmul_bf16_swiglu(isa, X, g_bits, u_bits, n0, n1), h)


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)
@pytest.mark.parametrize("M", [2, 12, 13, 40])
@pytest.mark.parametrize("K,I,N,shares", [(33, 50, 20, 1), (70, 96, 40, 2), (64, 200, 33, 3), (896, 128, 64, 2)])
def test_bf16_mlp_on_panels(isa, M, K, I, N, shares):
    # gate/up -> silu * up -> down_proj with the hidden rows handed over as bf16 token panels, written
    # by each share of their columns (I past the last whole block of 32: zero units to pad)
    if not _core.kernels.has_bf16_swiglu(isa):
        with pytest.raises(qwen2rt.InvalidInputError, match="no bf16 token panels"):
            z = np.zeros((I, K), np.uint16)
            _core.kernels.bf16_mlp_on_panels(isa, np.zeros((M, K), np.float32), z, z, np.zeros((N, I), np.uint16))
        return
    X = rng.standard_normal((M, K)).astype(np.float32)
    g_bits = bf16_bits(rng.standard_normal((I, K)) * 8 / np.sqrt(K))[0]
    u_bits = bf16_bits(rng.standard_normal((I, K)))[0]
    d_bits, Wd = bf16_bits(rng.standard_normal((N, I)))
    got = _core.kernels.bf16_mlp_on_panels(isa, X, g_bits, u_bits, d_bits, shares)
    # the hidden rows as the fused kernel makes them in f32 (test_matmul_bf16_swiglu checks those
    # against numpy), rounded to bf16 on their way into the panels
    h32 = _core.kernels.matmul_bf16_swiglu(isa, X, g_bits, u_bits)
    close(got, bf16_bits(h32)[1].astype(np.float64) @ Wd.T.astype(np.float64))
    # and the same sums as those f32 rows through matmul_bf16, which packs its own panels
    np.testing.assert_array_equal(got, _core.kernels.matmul(isa, h32, d_bits))
    # added into a residual stream instead: the same as adding the product after it is stored
    y0 = rng.standard_normal((M, N)).astype(np.float32)
    added = _core.kernels.bf16_mlp_on_panels(isa, X, g_bits, u_bits, d_bits, shares, y0)
    np.testing.assert_array_equal(added, y0 + got)


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)
@pytest.mark.parametrize("M", [2, 12, 13, 40])
@pytest.mark.parametrize("K,N,n0,n1", [(33, 50, 0, 50), (70, 50, 16, 50), (896, 96, 32, 80)])
def test_matmul_bf16_add(isa, M, K, N, n0, n1):
    # o_proj's product added into the residual stream as it is stored, only in the columns [n0, n1)
    X = rng.standard_normal((M, K)).astype(np.float32)
    bits, Wf = bf16_bits(rng.standard_normal((N, K)))
    y0 = rng.standard_normal((M, N)).astype(np.float32)
    if not _core.kernels.has_bf16_swiglu(isa):
        with pytest.raises(qwen2rt.InvalidInputError, match="no bf16 product into Y"):
            _core.kernels.matmul_bf16_add(isa, X, bits, y0)
        return
    got = _core.kernels.matmul_bf16_add(isa, X, bits, y0, n0, n1)
    want = y0.astype(np.float64)
    want[:, n0:n1] += (bf16_tokens(isa, M, X).astype(np.float64) @ Wf.T.astype(np.float64))[:, n0:n1]
    close(got, want)
    product = _core.kernels.matmul(isa, X, bits, None, n0, n1)
    want32 = y0.copy()
    want32[:, n0:n1] += product[:, n0:n1]
    np.testing.assert_array_equal(got, want32)  # the one f32 add the unfused residual makes


@pytest.mark.parametrize("isa", ISAS)
def test_matmul_large(isa):
    # more tokens than one 64-token block, more rows than one tile sweep
    X = rng.standard_normal((130, 300)).astype(np.float32)
    W = rng.standard_normal((75, 300)).astype(np.float32)
    close(_core.kernels.matmul(isa, X, W), X.astype(np.float64) @ W.T.astype(np.float64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("n", [1, 7, 16, 33, 896])
def test_rmsnorm(isa, rows, n):
    x = (3 * rng.standard_normal((rows, n))).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32)
    eps = 1e-6
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(axis=1, keepdims=True) + eps) * w
    close(_core.kernels.rmsnorm(isa, x, w, eps), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("half", [1, 3, 8, 32, 33])
def test_rope(isa, rows, half):
    x = rng.standard_normal((rows, 2 * half)).astype(np.float32)
    ang = rng.uniform(-100, 100, (rows, half))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x1, x2 = x[:, :half].astype(np.float64), x[:, half:].astype(np.float64)
    # rotate_half layout, as transformers: x*cos + rotate_half(x)*sin
    want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
    close(_core.kernels.rope(isa, x, cos, sin), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 16, 17, 100, 4864])
def test_silu_mul(isa, n):
    g = (4 * rng.standard_normal(n)).astype(np.float32)
    g[: min(n, 4)] = [-100.0, 100.0, 0.0, -20.0][: min(n, 4)]
    u = rng.standard_normal(n).astype(np.float32)
    g64 = g.astype(np.float64)
    want = g64 / (1 + np.exp(-g64)) * u
    close(_core.kernels.silu_mul(isa, g, u), want, rtol=2e-6)


def attention_ref(q, K, V, scale):
    s = scale * (q.astype(np.float64) @ K.T.astype(np.float64))
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p @ V.astype(np.float64)


# The cache's element types: numpy float32 / float16 arrays are held as they are; "bf16" passes float32
# that the binding rounds to bf16 and lays out as a bf16 cache (kernels.h).
KV_TYPES = [np.float32, np.float16, "bf16"]


def kv_values(a, kv):
    """a as the cache stores it (float32 for bf16: the binding rounds it exactly so)."""
    return bf16_bits(a)[1] if kv == "bf16" else a.astype(kv)


def attend(isa, q, K, V, scale, kv, **kw):
    """The kernel, and the reference over what it sees: the stored K and V; with a bf16 cache, q
    rounded to bf16 too. The SIMD bf16 kernel also rounds the probabilities to bf16: each is off by at
    most 2^-9 of itself, so the output by under 2^-8 of the largest value."""
    bf16 = kv == "bf16"
    got = _core.kernels.attention(isa, q, K, V, scale, bf16=bf16, **kw)
    qr = bf16_bits(q)[1] if bf16 else q
    return got, attention_ref(qr, K, V, scale), 4e-3 if bf16 else 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv", KV_TYPES)
@pytest.mark.parametrize("G", [1, 2, 5, 7, 8, 13, 17])
@pytest.mark.parametrize("D", [6, 16, 24, 64, 128])
@pytest.mark.parametrize("T", [1, 3, 8, 16, 17, 40, 200])
def test_attention(isa, kv, G, D, T):
    # K and V as the cache holds them (f32, f16 or bf16); the reference sees the same stored values
    q = (2 * rng.standard_normal((G, D))).astype(np.float32)
    K = kv_values(2 * rng.standard_normal((T, D)), kv)
    V = kv_values(rng.standard_normal((T, D)), kv)
    got, want, tol = attend(isa, q, K, V, 1 / np.sqrt(D), kv)
    close(got, want, tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv", KV_TYPES)
@pytest.mark.parametrize("G,D", [(1, 16), (7, 64), (13, 24), (12, 128)])
def test_attention_lse_merges_key_ranges(isa, kv, G, D):
    # with return_lse the kernel gives each head's log-sum-exp of its scaled scores; the outputs of
    # disjoint key ranges, weighted by exp(lse_r), merge into the output over all keys (split-KV)
    T = 300
    q = (2 * rng.standard_normal((G, D))).astype(np.float32)
    K = kv_values(2 * rng.standard_normal((T, D)), kv)
    V = kv_values(rng.standard_normal((T, D)), kv)
    scale = 1 / np.sqrt(D)
    (out, lse), want, tol = attend(isa, q, K, V, scale, kv, return_lse=True)
    close(out, want, tol)
    qr = bf16_bits(q)[1] if kv == "bf16" else q
    s = scale * (qr.astype(np.float64) @ K.T.astype(np.float64))
    want_lse = s.max(1) + np.log(np.exp(s - s.max(1, keepdims=True)).sum(1))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5 if kv != "bf16" else 2e-3)
    ranges = ((0, 96), (96, 160), (160, T))
    parts = [attend(isa, q, K[a:b], V[a:b], scale, kv, return_lse=True)[0] for a, b in ranges]
    lses = np.stack([p[1] for p in parts]).astype(np.float64)
    w = np.exp(lses - lses.max(0))
    merged = sum(w[i][:, None] * parts[i][0] for i in range(3)) / w.sum(0)[:, None]
    close(merged, want, tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv", KV_TYPES)
@pytest.mark.parametrize("G", [1, 7])
def test_attention_rising_scores(isa, kv, G):
    # scores that climb block after block: the running max moves on every block, and what the first
    # blocks added must be scaled down each time (to nothing, by the end)
    D, T = 64, 300
    u = np.zeros(D, np.float32)
    u[3] = 1.0
    K = kv_values(np.linspace(-4, 4, T)[:, None] * u + 0.01 * rng.standard_normal((T, D)), kv)
    V = kv_values(rng.standard_normal((T, D)), kv)
    q = np.tile(u * 3, (G, 1)).astype(np.float32)
    got, want, tol = attend(isa, q, K, V, 1.0, kv)
    close(got, want, tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kv", KV_TYPES)
def test_attention_peaked(isa, kv):
    # one key dominates: softmax must not overflow, and the output must be that key's value
    D, T = 64, 50
    K = kv_values(rng.standard_normal((T, D)), kv)
    V = kv_values(rng.standard_normal((T, D)), kv)
    q = (K[17].astype(np.float32) * 40)[None]
    got, want, tol = attend(isa, q, K, V, 1.0, kv)
    assert np.isfinite(got).all()
    close(got, want, tol)
    np.testing.assert_allclose(got[0], V[17], atol=1e-6 if kv != "bf16" else 1e-2)


def test_attention_rejects_mixed_kv_dtypes():
    import qwen2rt

    q = np.zeros((1, 8), np.float32)
    with pytest.raises(qwen2rt.InvalidInputError, match="both float32 or both float16"):
        _core.kernels.attention("generic", q, np.zeros((2, 8), np.float16), np.zeros((2, 8), np.float32), 1.0)


def test_isa_paths_listed():
    assert ISAS[0] == "generic"
    assert _core.active_isa() in ALL_ISAS_HERE  # QWEN2RT_ISA may name an emulated one


def test_unknown_isa_is_refused():
    import qwen2rt

    with pytest.raises(qwen2rt.InvalidInputError, match="not available"):
        qwen2rt.set_isa("sse9")


def test_read_bandwidth_reads_any_size():
    # bench.py's roofline: bytes per second, for a size that is not a whole number of read blocks too
    assert _core.read_bandwidth(1 << 22, 2, 1) > 1e8
    assert _core.read_bandwidth((1 << 20) + 40, 1, 1) > 1e8


def test_bench_bandwidth_sample_stays_out_of_peak_rss():
    # bench.py samples the bandwidth inside an engine's process, around its decode; the sample's
    # 256 MiB buffer must not count in the peak RSS that the benchmark reports for that engine. A fresh
    # process, so that the peak is small before the sample.
    import os
    import subprocess
    import sys

    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("AddressSanitizer's shadow of the buffer stays resident: RSS says nothing there")
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench.py")
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('bench', sys.argv[1]); "
            "b = importlib.util.module_from_spec(s); s.loader.exec_module(b); "
            "p0 = b.peak_rss_bytes(); bw = b.bandwidth_now(1); "
            "print(p0, b.peak_rss_bytes(), b._peak_rss_outside_samples, bw)")
    out = subprocess.run([sys.executable, "-c", code, bench], capture_output=True, text=True, check=True).stdout
    before, after, kept, bw = out.split()
    if bw == "None":
        pytest.skip("no /proc/self/clear_refs to reset the peak with")
    assert float(bw) > 1e8
    assert int(kept) >= int(before)  # the peak before the sample is kept for the report
    assert int(after) < int(before) + (64 << 20), (before, after)  # and the buffer is not in it


def test_multiply_add_peak_counts_each_instruction():
    # bench.py's prefill roofline: ops per second of the f32, bf16 and int8 instructions, whose
    # multiply-adds per instruction are 16, 32 and 64; refused without the AVX-512 kernels
    if "avx512" not in _core.available_isas():
        with pytest.raises(qwen2rt.InvalidInputError, match="avx512"):
            _core.multiply_add_peak("bf16", 1)
        return
    peaks = {op: _core.multiply_add_peak(op, 1) for op in ("f32", "bf16", "int8")}
    assert all(p > 1e9 for p in peaks.values()), peaks
    with pytest.raises(qwen2rt.InvalidInputError, match="op must be"):
        _core.multiply_add_peak("fp8", 1)
    with pytest.raises(qwen2rt.InvalidInputError, match="threads"):
        _core.multiply_add_peak("f32", 0)


def test_attention_seconds_times_the_kernel():
    # benchmarks/attention.py's timer: a positive time, and bad sizes refused before allocating
    for kv in ("f32", "f16", "bf16"):
        assert 0 < _core.kernels.attention_seconds(ISAS[-1], 7, 64, 40, kv, 3, 2, 2) < 10
        assert 0 < _core.kernels.attention_seconds("generic", 2, 6, 9, kv, 1, 1, 1) < 10
    with pytest.raises(qwen2rt.InvalidInputError, match="attention_seconds"):
        _core.kernels.attention_seconds("generic", 0, 64, 40)


def test_bench_decode_at_contexts_in_one_process(tmp_path):
    # bench.py's long-context ratio: a model per context in one process, alternating blocks of decode
    # steps; each block is timed, and the long model goes on from its prompt (its cache grows by a
    # block each time, so max_context must hold all of them).
    import importlib.util
    import os

    from tiny_model import make_checkpoint

    make_checkpoint(tmp_path / "m", seed=5)
    s = importlib.util.spec_from_file_location("bench", os.path.join(os.path.dirname(__file__), "..", "benchmarks",
                                                                      "bench.py"))
    bench = importlib.util.module_from_spec(s)
    s.loader.exec_module(bench)
    spec = dict(model=str(tmp_path / "m"), gguf=None, dtype="f32", threads=1, short=8, contexts=[40, 24], blocks=3,
                block=4, max_context=40 + 3 * 4)
    out = bench._run_paired_contexts(spec)
    assert sorted(out) == ["at_24_s", "at_40_s", "at_8_s"]
    assert all(len(v) == 3 and min(v) > 0 for v in out.values())
    spec["max_context"] = 40 + 2 * 4  # one block short: the long model's third block does not fit
    with pytest.raises(qwen2rt.InvalidInputError):
        bench._run_paired_contexts(spec)
