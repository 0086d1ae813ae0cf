"""The C++ GGUF dequantizers (_core.dequantize_gguf) against the gguf package's numpy reference,
bit for bit: random blocks, all-zero blocks, extreme scales, every implemented format."""


import numpy as np
import pytest

import qwen2rt
from qwen2rt import _core

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402


# name -> (ggml type id, elements per block, bytes per block, byte offsets of the f16 scales in a block)
FORMATS = {
    "F16": (1, 1, 2, [0]),
    "BF16": (30, 1, 2, []),
    "Q4_0": (2, 32, 18, [0]),
    "Q4_1": (3, 32, 20, [0, 2]),
    "Q5_0": (6, 32, 22, [0]),
    "Q5_1": (7, 32, 24, [0, 2]),
    "Q8_0": (8, 32, 34, [0]),
    "Q2_K": (10, 256, 84, [80, 82]),
    "Q3_K": (11, 256, 110, [108]),
    "Q4_K": (12, 256, 144, [0, 2]),
    "Q5_K": (13, 256, 176, [0, 2]),
    "Q6_K": (14, 256, 210, [208]),
}
# F16 and BF16 "blocks" are single elements; test them in runs of 64 so a "block" count means something.
ELEMENT_RUN = 64


def block_geometry(name):
    type_id, block, nbytes, scales = FORMATS[name]
    if block == 1:
        return type_id, ELEMENT_RUN, nbytes * ELEMENT_RUN, []
    return type_id, block, nbytes, scales


def finite_f16_bits(rng, shape):
    """Random half-precision bit patterns over the whole finite range (subnormals and zeros included)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exp = (bits >> 10) & 0x1F
    return np.where(exp == 0x1F, bits & ~np.uint16(0x0400), bits).astype(np.uint16)


def random_blocks(name, n_blocks, rng, finite_f16=True):
    """n_blocks random blocks as a (n_blocks, block_bytes) uint8 array, with finite f16 scales."""
    _, _, nbytes, scales = block_geometry(name)
    data = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    if name == "F16" and finite_f16:
        data = finite_f16_bits(rng, (n_blocks, nbytes // 2)).view(np.uint8)
    for off in scales:
        data[:, off : off + 2] = finite_f16_bits(rng, (n_blocks, 1)).view(np.uint8)
    return np.ascontiguousarray(data)


def special_blocks(name):
    """All-zero and all-0xFF blocks (NaN scales), and the extreme finite scales (largest, smallest
    subnormal, negative, negative zero)."""
    _, _, nbytes, scales = block_geometry(name)
    out = [np.zeros(nbytes, np.uint8), np.full(nbytes, 0xFF, np.uint8)]
    for scale in (0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0400, 0x8000, 0x3C00):
        for fill in (0x00, 0xFF, 0x55, 0xAA):
            b = np.full(nbytes, fill, np.uint8)
            if name == "F16":
                b = np.full(nbytes // 2, scale, np.uint16).view(np.uint8).copy()
            for off in scales:
                b[off : off + 2] = np.array([scale], np.uint16).view(np.uint8)
            out.append(b)
    if not scales and name != "F16":  # BF16: the extreme bit patterns
        for v in (0x7F7F, 0xFF7F, 0x0001, 0x8001, 0x7F80, 0xFF80, 0x8000, 0x3F80):
            out.append(np.full(nbytes // 2, v, np.uint16).view(np.uint8).copy())
    return np.stack(out)


def reference(name, blocks, rows=1):
    """gguf's numpy dequantization of `blocks` laid out as `rows` rows, flattened."""
    type_id = FORMATS[name][0]
    data = blocks.reshape(rows, -1)
    with np.errstate(all="ignore"):  # inf/NaN scales
        return np.asarray(dequantize(data, GGMLQuantizationType(type_id)), dtype=np.float32).ravel()


def ours(name, blocks, threads=1):
    type_id, block, _, _ = block_geometry(name)
    raw = np.ascontiguousarray(blocks).reshape(-1)
    n = blocks.shape[0] * block
    return _core.dequantize_gguf(type_id, raw, n, threads)


def assert_bit_equal(got, want):
    assert got.dtype == np.float32 and want.dtype == np.float32
    assert got.shape == want.shape
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    np.testing.assert_array_equal(nan_got, nan_want)
    g, w = got[~nan_got].view(np.uint32), want[~nan_want].view(np.uint32)
    if not np.array_equal(g, w):
        bad = np.flatnonzero(g != w)
        i = bad[0]
        raise AssertionError(
            f"{bad.size} of {g.size} values differ; first at {i}: got {got[~nan_got][i]!r} ({g[i]:#010x}), "
            f"want {want[~nan_want][i]!r} ({w[i]:#010x})"
        )


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("n_blocks", [1, 3, 17])
def test_random_blocks_match_gguf(name, n_blocks):
    rng = np.random.default_rng(1000 * n_blocks + FORMATS[name][0])
    blocks = random_blocks(name, n_blocks, rng)
    assert_bit_equal(ours(name, blocks), reference(name, blocks))


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rows_match_gguf(name, rows):
    """A [rows, 3 blocks] matrix, dequantized row by row by gguf and in one call by us."""
    rng = np.random.default_rng(77 + rows + FORMATS[name][0])
    blocks = random_blocks(name, rows * 3, rng)
    assert_bit_equal(ours(name, blocks), reference(name, blocks, rows=rows))


@pytest.mark.parametrize("name", list(FORMATS))
def test_special_blocks_match_gguf(name):
    blocks = special_blocks(name)
    assert_bit_equal(ours(name, blocks), reference(name, blocks))


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "F16"])
def test_non_finite_scales_match_gguf(name):
    """inf/NaN scales (and, for F16/BF16, arbitrary bit patterns): NaN where gguf has NaN."""
    rng = np.random.default_rng(5)
    blocks = random_blocks(name, 8, rng)
    for i, off in enumerate(FORMATS[name][3]):
        blocks[i % 8, off : off + 2] = np.array([0x7C00], np.uint16).view(np.uint8)
        blocks[(i + 3) % 8, off : off + 2] = np.array([0xFE01], np.uint16).view(np.uint8)
    assert_bit_equal(ours(name, blocks), reference(name, blocks))


def test_f16_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _core.dequantize_gguf(1, bits.view(np.uint8), bits.size, 1)
    assert_bit_equal(got, bits.view(np.float16).astype(np.float32))
    # NaNs keep their sign and payload as well
    h = bits.astype(np.uint32)
    nan = np.isnan(got)
    want = (h & 0x8000) << 16 | 0x7F800000 | (h & 0x3FF) << 13
    assert np.array_equal(got.view(np.uint32)[nan], want[nan])


def test_bf16_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = _core.dequantize_gguf(30, bits.view(np.uint8), bits.size, 1)
    assert np.array_equal(got.view(np.uint32), bits.astype(np.uint32) << 16)


@pytest.mark.parametrize("name", list(FORMATS))
def test_threads_match_single_thread(name):
    rng = np.random.default_rng(9)
    blocks = random_blocks(name, 1001, rng)
    one = ours(name, blocks, threads=1)
    assert_bit_equal(one, reference(name, blocks))
    for threads in (2, 4, 7):
        assert_bit_equal(ours(name, blocks, threads=threads), one)


@pytest.mark.parametrize("name", list(FORMATS))
def test_wrong_byte_count_raises(name):
    type_id, block, nbytes = FORMATS[name][:3]
    n = 4 * block
    good = np.zeros(4 * nbytes, np.uint8)
    assert _core.dequantize_gguf(type_id, good, n, 1).shape == (n,)
    for raw in (good[:-1], np.zeros(4 * nbytes + 1, np.uint8), good[:nbytes]):
        with pytest.raises(qwen2rt.InvalidInputError):
            _core.dequantize_gguf(type_id, np.ascontiguousarray(raw), n, 1)
    if block > 1:  # element count not a multiple of the block size
        with pytest.raises(qwen2rt.InvalidInputError):
            _core.dequantize_gguf(type_id, good, n - 1, 1)
    with pytest.raises(qwen2rt.InvalidInputError):
        _core.dequantize_gguf(type_id, good, -block, 1)
    with pytest.raises(qwen2rt.InvalidInputError):
        _core.dequantize_gguf(type_id, good.reshape(2, -1), n, 1)
    with pytest.raises(qwen2rt.InvalidInputError):
        _core.dequantize_gguf(type_id, good, n, 0)


@pytest.mark.parametrize("type_id", [0, 4, 5, 9, 15, 16, 20, 23, 24, 31, 39, 99, -1, 1 << 20])
def test_unknown_type_raises(type_id):
    with pytest.raises(qwen2rt.InvalidInputError):
        _core.dequantize_gguf(type_id, np.zeros(1024, np.uint8), 256, 1)


def test_empty():
    assert _core.dequantize_gguf(2, np.zeros(0, np.uint8), 0, 4).shape == (0,)


@pytest.mark.real_weights
def test_real_gguf_matches_gguf(real_gguf):
    from qwen2rt.gguf_io import GGUFFile

    g = GGUFFile(real_gguf)
    ids = {v[0] for v in FORMATS.values()}
    checked = 0
    for name, t in g.tensors.items():
        if t.type_id not in ids:
            continue
        raw = g.raw(name)
        count = int(np.prod(t.shape))
        got = _core.dequantize_gguf(t.type_id, raw, count, 2)
        want = np.asarray(
            dequantize(raw.reshape(t.numpy_shape[:-1] + (-1,)), GGMLQuantizationType(t.type_id)), dtype=np.float32
        ).ravel()
        assert_bit_equal(got, want)
        if t.type_name not in ("F16", "BF16"):  # GGUFFile.array hands block formats to the same code
            arr, dtype = g.array(name)
            assert dtype == "f32" and arr.shape == t.numpy_shape
            assert np.array_equal(arr.ravel().view(np.uint32), got.view(np.uint32))
        checked += 1
    assert checked > 0
