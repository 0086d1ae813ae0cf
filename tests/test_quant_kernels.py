"""q8 / q6 / q4 packing and the integer matmul kernels of every ISA path, against numpy."""

import numpy as np
import pytest

from isa_paths import ALL_ISAS_HERE, TILE_ISAS
from qwen2rt import _core

ISAS = _core.available_isas()
K_ = _core.kernels
rng = np.random.default_rng(99)


def acts_ref(X):
    """Activation quantization as the kernels define it: blocks of 32, scale max|x|/127."""
    M, K = X.shape
    B = -(-K // 32)
    Xp = np.zeros((M, B * 32), np.float32)
    Xp[:, :K] = X
    blocks = Xp.reshape(M, B, 32)
    amax = np.abs(blocks).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(blocks * inv[..., None]).astype(np.int8)  # rint: round half to even, as the kernels
    return q.reshape(M, B * 32), (amax / np.float32(127)).astype(np.float32), q.astype(np.int32).sum(-1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("K", [1, 31, 32, 33, 100, 896])
def test_quantize_acts(isa, M, K):
    X = (3 * rng.standard_normal((M, K))).astype(np.float32)
    X[0, : min(K, 3)] = 0  # a block that starts with zeros
    if M > 1:
        X[1] = 0  # an all-zero row: scale 0, q 0
    q, d, s = K_.quantize_acts(isa, X)
    rq, rd, rs = acts_ref(X)
    np.testing.assert_array_equal(q, rq)
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_allclose(d, rd, rtol=1e-7)


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_acts_ties_round_to_even(isa):
    # amax 127 makes the scale 1, so these land exactly halfway between two integers
    row = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5] + [0] * 23 + [-127, 3.5], np.float32)
    q, d, s = K_.quantize_acts(isa, row[None, :])
    rq, rd, rs = acts_ref(row[None, :])
    np.testing.assert_array_equal(q, rq)
    assert q[0, 1:9].tolist() == [0, 2, 2, 0, -2, -2, 126, -126]
    np.testing.assert_array_equal(s, rs)


BLOCK_BYTES = {"q8": 544, "q6": 416, "q4": 288}


@pytest.mark.parametrize("fmt", ["q8", "q6", "q4"])
@pytest.mark.parametrize("N, K", [(1, 32), (15, 64), (16, 96), (17, 100), (40, 33), (33, 896)])
def test_pack_roundtrip(fmt, N, K):
    W = rng.standard_normal((N, K)).astype(np.float32)
    packed = K_.quantize_weights(fmt, W)
    assert packed.size == -(-N // 16) * -(-K // 32) * BLOCK_BYTES[fmt]
    Wd = K_.dequantize_weights(fmt, packed, N, K)
    Bp = -(-K // 32) * 32
    Wp = np.zeros((N, Bp), np.float32)
    Wp[:, :K] = W
    amax = np.abs(Wp.reshape(N, -1, 32)).max(-1, keepdims=True)
    err = np.abs(Wd - W).reshape(N, -1)
    err_blocks = np.zeros((N, Bp), np.float32)
    err_blocks[:, :K] = err
    if fmt == "q8":  # round to nearest: at most half a step of max|w| / 127
        assert (err_blocks.reshape(N, -1, 32) <= amax / 254 * 1.01 + 1e-7).all()
    else:  # least-squares scales trade a clamped outlier for the rest: bound the RMS error
        rms = np.sqrt((err**2).mean() / (W**2).mean())
        assert rms < (0.12 if fmt == "q4" else 0.03), rms


def unpack_q6(packed, N, K):
    """The q6 layout of csrc/quant.h read with numpy, independently of the C++ reader: per 16-row
    group and 32-column block, 16 f16 scales, 4 x 64 bytes of low nibbles (as q4), 2 x 64 bytes of
    high bit pairs; w = scale * (level - 32)."""
    G, B = -(-N // 16), -(-K // 32)
    blk = packed.reshape(G, B, 416)
    scale = blk[:, :, :32].copy().view(np.float16).astype(np.float32)  # [G, B, 16]
    nib = blk[:, :, 32:288].reshape(G, B, 4, 16, 4)  # [g, b, i, row, j]
    high = blk[:, :, 288:].reshape(G, B, 2, 16, 4)  # [g, b, h, row, j]
    level = np.zeros((G, B, 16, 32), np.int32)
    for c in range(32):
        i, j = c // 8, c % 4
        low = (nib[:, :, i, :, j] >> (4 if c % 8 >= 4 else 0)) & 15
        h, m = c // 16, (c // 4) % 4
        level[:, :, :, c] = low | ((high[:, :, h, :, j] >> (2 * m)) & 3) << 4
    W = (level - 32) * scale[..., None]  # [G, B, 16 rows, 32 cols]
    return W.transpose(0, 2, 1, 3).reshape(G * 16, B * 32)[:N, :K]


def test_q6_layout_and_error():
    """q6 as quant.h documents it, and a quarter of q4's rounding error (2 more bits)."""
    W = rng.standard_normal((40, 200)).astype(np.float32)
    packed = K_.quantize_weights("q6", W)
    Wd = K_.dequantize_weights("q6", packed, 40, 200)
    np.testing.assert_array_equal(unpack_q6(packed, 40, 200), Wd)
    err = {f: np.sqrt(((K_.dequantize_weights(f, K_.quantize_weights(f, W), 40, 200) - W) ** 2).mean())
           for f in ("q4", "q6")}
    assert 0.2 * err["q4"] < err["q6"] < 0.3 * err["q4"], err


def test_q4_scale_search_beats_plain_q4_0():
    """The searched q4 scales give a lower squared error than Q4_0's max/-8 rule on Gaussian rows."""
    W = rng.standard_normal((64, 4096)).astype(np.float32)
    Wd = K_.dequantize_weights("q4", K_.quantize_weights("q4", W), 64, 4096)
    blocks = W.reshape(64, -1, 32)
    idx = np.abs(blocks).argmax(-1)[..., None]
    mx = np.take_along_axis(blocks, idx, -1)
    d = (mx / -8).astype(np.float16).astype(np.float32)
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    q0 = np.clip(np.rint(blocks * inv), -8, 7)
    plain = ((q0 * d - blocks) ** 2).mean()
    ours = ((Wd - W) ** 2).mean()
    assert ours < 0.97 * plain, (ours, plain)


def bf16_round(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)  # the emulated AMX tiles too
@pytest.mark.parametrize("fmt", ["q8", "q6", "q4"])
@pytest.mark.parametrize("M", [1, 3, 5, 16, 17, 33, 70])
@pytest.mark.parametrize("N, K", [(1, 32), (16, 64), (17, 100), (40, 33), (48, 896)])
def test_matmul_q(isa, fmt, M, N, K):
    X = (2 * rng.standard_normal((M, K))).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    packed = K_.quantize_weights(fmt, W)
    Y = K_.matmul_q(isa, fmt, X, packed, N, bias)
    # the same numbers in float64: dequantized weights times dequantized activations, or on the AMX
    # tiles (prompts of 16 tokens or more) the weights and the float32 activations rounded to bf16
    Wd = K_.dequantize_weights(fmt, packed, N, K)
    if isa in TILE_ISAS and M >= 16:
        Wd, Xd = bf16_round(Wd), bf16_round(X)
    else:
        q, d, s = K_.quantize_acts(isa, X)
        Xd = (q.reshape(M, -1, 32).astype(np.float64) * d[..., None]).reshape(M, -1)[:, :K]
    want = Xd.astype(np.float64) @ Wd.T.astype(np.float64) + bias
    np.testing.assert_allclose(Y, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # and close to the float product (quantization error only)
    exact = X.astype(np.float64) @ W.T.astype(np.float64) + bias
    scale = np.abs(X).astype(np.float64) @ np.abs(W).T.astype(np.float64)  # sum |x| |w|: no cancellation
    rel = (np.abs(Y - exact) / scale).max()
    assert rel < {"q8": 0.02, "q6": 0.05, "q4": 0.15}[fmt], rel


@pytest.mark.parametrize("isa", ALL_ISAS_HERE)  # the emulated AMX tiles too
def test_matmul_q_extreme_activations(isa):
    """Activations at +-127 with weights at the ends of their range: no int16 saturation (AVX2)."""
    K, N = 64, 16
    X = np.full((2, K), 5.0, np.float32)
    X[1, ::2] = -5.0
    W = np.full((N, K), 1.0, np.float32)
    W[::2] *= -1
    W6 = np.full((N, K), 0.99, np.float32)  # q6: levels 31 (stored 63) but for the first column, -32
    W6[:, 0] = -1.0
    for fmt, w in (("q8", W), ("q4", W), ("q6", W), ("q6", W6)):
        packed = K_.quantize_weights(fmt, w)
        Y = K_.matmul_q(isa, fmt, X, packed, N)
        Wd = K_.dequantize_weights(fmt, packed, N, K).astype(np.float64)
        np.testing.assert_allclose(Y, X.astype(np.float64) @ Wd.T, rtol=1e-5)
    assert (unpack_q6(K_.quantize_weights("q6", W6), N, K)[:, 1:] > 0).all()


# --- token tiles: the AMX prompt path as the model runs it (kernels.h: tile_tokens, matmul_tiles,
# swiglu_tiles), each input rounded to bf16 once into tiles, rows past M holding NaN ---

TILE_ISAS_HERE = [i for i in TILE_ISAS if i in ALL_ISAS_HERE]


def tile_weights(fmt, W):
    """W as matmul_on_tiles takes it, and the float values the tiles multiply (bf16)."""
    if fmt == "bf16":
        bits = (
            (W.astype(np.float32).view(np.uint32) + 0x7FFF + ((W.astype(np.float32).view(np.uint32) >> 16) & 1)) >> 16
        ).astype(np.uint16)
        return bits, bf16_round(W)
    packed = K_.quantize_weights(fmt, W)
    return packed, bf16_round(K_.dequantize_weights(fmt, packed, *W.shape))


@pytest.mark.parametrize("isa", TILE_ISAS_HERE)
@pytest.mark.parametrize("fmt", ["bf16", "q8", "q6", "q4"])
@pytest.mark.parametrize("M, K, N, n0, n1", [(16, 32, 16, 0, 16), (45, 200, 48, 16, 40), (70, 96, 64, 32, 64)])
def test_matmul_on_tiles(isa, fmt, M, K, N, n0, n1):
    """Bias as the tiles' initial value, a product added into Y (o_proj / down_proj into the
    residual), edge tiles (tokens past M, rows past n1), rows written in column shares: against numpy
    on the bf16-rounded operands; the columns outside [n0, n1) untouched."""
    if fmt != "bf16" and n0 % 16:
        pytest.skip("q8 / q6 / q4 start a share on a 16-row group")
    X = (2 * rng.standard_normal((M, K))).astype(np.float32)
    W, Wd = tile_weights(fmt, rng.standard_normal((N, K)).astype(np.float32))
    bias = rng.standard_normal(N).astype(np.float32)
    y0 = rng.standard_normal((M, N)).astype(np.float32)
    prod = bf16_round(X).astype(np.float64) @ Wd.T.astype(np.float64)
    for b, y in [(None, None), (bias, None), (None, y0), (bias, y0)]:
        got = K_.matmul_on_tiles(isa, fmt, X, W, N, b, n0, n1, y, shares=3)
        want = np.zeros((M, N)) if y is None else y.astype(np.float64)
        want[:, n0:n1] += prod[:, n0:n1] + (0 if b is None else b[n0:n1])
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("isa", TILE_ISAS_HERE)
@pytest.mark.parametrize("fmt", ["bf16", "q8", "q6", "q4"])
@pytest.mark.parametrize("M, K, I", [(16, 64, 96), (45, 100, 80)])
def test_mlp_on_tiles(isa, fmt, M, K, I):
    """silu(gate) * up straight into the hidden rows' tiles (swiglu_tiles, in column shares, one
    ending at I mid-block), then down_proj added into y0: exactly the unfused tile products with
    silu_mul between them, and near numpy."""
    N = 48
    X = rng.standard_normal((M, K)).astype(np.float32)
    (G, Gd), (U, Ud) = (tile_weights(fmt, rng.standard_normal((I, K)).astype(np.float32)) for _ in range(2))
    D, Dd = tile_weights(fmt, rng.standard_normal((N, I)).astype(np.float32))
    y0 = rng.standard_normal((M, N)).astype(np.float32)
    got = K_.mlp_on_tiles(isa, fmt, X, G, U, D, I, N, y0, shares=3)
    g = K_.matmul_on_tiles(isa, fmt, X, G, I)
    u = K_.matmul_on_tiles(isa, fmt, X, U, I)
    h = np.stack([K_.silu_mul(isa, g[m], u[m]) for m in range(M)])
    np.testing.assert_array_equal(got, K_.matmul_on_tiles(isa, fmt, h, D, N, y0=y0))
    xb = bf16_round(X).astype(np.float64)
    g64, u64 = xb @ Gd.T.astype(np.float64), xb @ Ud.T.astype(np.float64)
    h64 = bf16_round((g64 / (1 + np.exp(-g64)) * u64).astype(np.float32)).astype(np.float64)
    want = y0 + h64 @ Dd.T.astype(np.float64)
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()


@pytest.mark.parametrize("isa", TILE_ISAS_HERE)
def test_tile_products_keep_the_threads_tile_config(isa):
    """A product on the tiles puts back the tile configuration it found on the thread: other AMX code
    in the process (llama.cpp's kernels configure a thread's tiles once and keep them) must find its
    own, or its next tile instruction faults."""
    assert K_.amx_keeps_tile_config(emulated=isa != "amx")
