"""Hostile files: GGUF broken field by field, converted qwen2rt folders, and the JSON files of a
model folder. Each ends in a qwen2rt error whose message names the file and the problem; none
crashes, hangs, or allocates gigabytes on a few bytes of input."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import qwen2rt
from qwen2rt import FormatError, Qwen2rtError, UnsupportedModelError
from qwen2rt.gguf_io import GGUFFile
from tiny_model import edit_safetensors_header, make_checkpoint, write_gguf

# -- GGUF taken apart and put back together ---------------------------------------------------
# GGUF value types (gguf_io has the same table): id -> bytes of a scalar
SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
U8, U32, I32, F32, STRING, ARRAY, U64 = 0, 4, 5, 6, 8, 9, 10


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def gstr(s):
    raw = s.encode() if isinstance(s, str) else s
    return u64(len(raw)) + raw


def skip_value(buf, pos, vtype):
    """The offset just past a metadata value of type vtype at pos."""
    if vtype in SCALAR_SIZE:
        return pos + SCALAR_SIZE[vtype]
    if vtype == STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    assert vtype == ARRAY
    itype, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if itype in SCALAR_SIZE:
        return pos + n * SCALAR_SIZE[itype]
    for _ in range(n):
        pos = skip_value(buf, pos, itype)
    return pos


class Gguf:
    """A GGUF file as parts to edit: metadata as (key, type, encoded value), the tensor table as
    [name, dims, type, offset] (offsets from the start of the data section), the data section."""

    def __init__(self, raw: bytes):
        assert raw[:4] == b"GGUF"
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
        pos = 24
        self.kv = []
        for _ in range(n_kv):
            n = struct.unpack_from("<Q", raw, pos)[0]
            key = raw[pos + 8 : pos + 8 + n].decode()
            vtype = struct.unpack_from("<I", raw, pos + 8 + n)[0]
            start = pos + 12 + n
            pos = skip_value(raw, start, vtype)
            self.kv.append((key, vtype, raw[start:pos]))
        self.kv_end = pos
        self.tensors = []
        for _ in range(n_tensors):
            n = struct.unpack_from("<Q", raw, pos)[0]
            name = raw[pos + 8 : pos + 8 + n].decode()
            pos += 8 + n
            n_dims = struct.unpack_from("<I", raw, pos)[0]
            dims = list(struct.unpack_from(f"<{n_dims}Q", raw, pos + 4))
            ttype, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            self.tensors.append([name, dims, ttype, offset])
        self.table_end = pos
        self.data_start = -(-pos // 32) * 32
        self.data = raw[self.data_start :]
        self.alignment = 32

    def align(self, alignment):
        """Lays the data section out again with every tensor on a multiple of `alignment` (all are F32)."""
        data = bytearray()
        for t in sorted(self.tensors, key=lambda t: t[3]):
            nbytes = 4 * int(np.prod(t[1]))
            data += b"\0" * (-len(data) % alignment)
            t[3], data = len(data), data + self.data[t[3] : t[3] + nbytes]
        self.data, self.alignment = bytes(data), alignment

    def set(self, key, vtype, value: bytes):
        """Replaces (or adds) a metadata entry; value is the encoded value."""
        self.kv = [e for e in self.kv if e[0] != key] + [(key, vtype, value)]

    def tensor(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def encode(self, n_tensors=None, n_kv=None, version=None, magic=b"GGUF") -> bytes:
        out = bytearray(magic + u32(self.version if version is None else version))
        out += u64(len(self.tensors) if n_tensors is None else n_tensors)
        out += u64(len(self.kv) if n_kv is None else n_kv)
        for key, vtype, value in self.kv:
            out += gstr(key) + u32(vtype) + value
        for name, dims, ttype, offset in self.tensors:
            out += gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ttype) + u64(offset)
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out + self.data)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A one-layer tiny model: its Hugging Face folder and an F32 GGUF of it."""
    folder = tmp_path_factory.mktemp("src")
    model = make_checkpoint(folder, shape="mha", layers=1, max_position_embeddings=64)
    write_gguf(folder / "m.gguf", model, folder, "F32")
    return folder


@pytest.fixture(scope="module")
def raw(src):
    return (src / "m.gguf").read_bytes()


@pytest.fixture
def g(raw):
    return Gguf(raw)


def refused(tmp_path, data: bytes, error, problem, reader=qwen2rt.Model):
    """Writes data as hostile.gguf; reading it raises `error` naming the file, then `problem`."""
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    with pytest.raises(error, match=re.escape(str(path)) + ".*(?:" + problem + ")"):
        reader(path)


def test_valid_file_round_trips(src, raw, g):
    """The parts put back together are the file itself, and it loads: the cases below break only what they say."""
    assert g.encode() == raw
    m = qwen2rt.Model(src / "m.gguf", dtype="f32")
    assert m.forward([1, 2]).shape == (m.config.vocab_size,)
    assert {"qwen2.embedding_length", "general.architecture"} <= {k for k, _, _ in g.kv}


# -- header ------------------------------------------------------------------------------------

def test_bad_magic(g, tmp_path):
    refused(tmp_path, g.encode(magic=b"GGUG"), FormatError, "not a GGUF file", reader=GGUFFile)
    refused(tmp_path, g.encode(magic=b"GGUG"), UnsupportedModelError, "neither a Hugging Face model folder nor a GGUF")


@pytest.mark.parametrize("version", [0, 1, 4, 2**32 - 1])
def test_bad_version(g, tmp_path, version):
    refused(tmp_path, g.encode(version=version), UnsupportedModelError, f"GGUF version {version}")


@pytest.mark.parametrize("count", [2**31, 2**32 + 1, 2**63, 2**64 - 1])
def test_counts_in_the_billions(g, tmp_path, count):
    refused(tmp_path, g.encode(n_tensors=count), FormatError, f"tensor count {count} cannot fit")
    refused(tmp_path, g.encode(n_kv=count), FormatError, f"metadata count {count} cannot fit")


def test_counts_larger_than_the_entries(g, tmp_path):
    """Counts that could fit the file but exceed the entries written: the reader runs into the next section."""
    refused(tmp_path, g.encode(n_kv=len(g.kv) + 1), FormatError, "")
    refused(tmp_path, g.encode(n_tensors=len(g.tensors) + 1), FormatError, "")


# -- metadata ----------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [2**16 + 1, 2**40, 2**63, 2**64 - 1])
def test_key_length_past_the_file(g, tmp_path, length):
    data = bytearray(g.encode())
    struct.pack_into("<Q", data, 24, length)  # the first key's length
    refused(tmp_path, bytes(data), FormatError, "metadata key #0 is .* bytes long|runs past the end")


@pytest.mark.parametrize("length", [10**6, 2**40, 2**63, 2**64 - 1])
def test_string_length_past_the_file(g, tmp_path, length):
    g.set("general.name", STRING, u64(length) + b"x")
    refused(tmp_path, g.encode(), FormatError, "value of 'general.name' at offset .* runs past the end")


@pytest.mark.parametrize("itype, length", [(U8, 2**40), (U32, 2**62), (U64, 2**61), (U32, 2**64 - 1), (STRING, 2**60),
                                           (STRING, 2**64 - 1), (U8, 10**6)])
def test_array_length_past_the_file(g, tmp_path, itype, length):
    g.set("tokenizer.ggml.token_type", ARRAY, u32(itype) + u64(length) + u32(1))
    refused(tmp_path, g.encode(), FormatError, "'tokenizer.ggml.token_type'.*(past the end|strings)")


def test_string_in_an_array_past_the_file(g, tmp_path):
    g.set("tokenizer.ggml.merges", ARRAY, u32(STRING) + u64(2) + gstr("a b") + u64(2**63) + b"x")
    refused(tmp_path, g.encode(), FormatError, "'tokenizer.ggml.merges' runs past the end")


@pytest.mark.parametrize("vtype", [13, 255, 2**32 - 1])
def test_unknown_value_type(g, tmp_path, vtype):
    g.set("general.name", vtype, b"")
    refused(tmp_path, g.encode(), FormatError, f"'general.name' has unknown value type {vtype}")


@pytest.mark.parametrize("itype", [13, 2**31])
def test_unknown_array_item_type(g, tmp_path, itype):
    g.set("general.tags", ARRAY, u32(itype) + u64(1) + u32(0))
    refused(tmp_path, g.encode(), FormatError, f"'general.tags' has unknown item type {itype}")


def test_nested_arrays(g, tmp_path):
    inner = u32(U8) + u64(2) + b"\1\2"
    g.set("general.tags", ARRAY, u32(ARRAY) + u64(1) + inner)
    refused(tmp_path, g.encode(), UnsupportedModelError, "'general.tags' is an array of arrays")


def test_duplicate_key(g, tmp_path):
    g.kv.append(g.kv[0])
    refused(tmp_path, g.encode(), FormatError, f"metadata key '{g.kv[0][0]}' appears twice")


@pytest.mark.parametrize("where", ["key", "value", "array item"])
def test_invalid_utf8(g, tmp_path, where):
    bad = b"caf\xc3(\xff"
    if where == "key":
        g.kv.append((bad, U32, u32(1)))
        problem = "metadata key #.* is not valid UTF-8"
    elif where == "value":
        g.set("general.name", STRING, gstr(bad))
        problem = "value of 'general.name' is not valid UTF-8"
    else:
        g.set("tokenizer.ggml.merges", ARRAY, u32(STRING) + u64(2) + gstr("a b") + gstr(bad))
        problem = "item 1 of 'tokenizer.ggml.merges' is not valid UTF-8"
    refused(tmp_path, g.encode(), FormatError, problem)


@pytest.mark.parametrize(
    "vtype, value",
    [(U32, u32(0)), (U32, u32(3)), (U32, u32(48)), (U64, u64(2**40)), (U64, u64(2**63)), (I32, struct.pack("<i", -32)),
     (STRING, gstr("32")), (F32, struct.pack("<f", 32.0))],
)
def test_bad_alignment(g, tmp_path, vtype, value):
    g.set("general.alignment", vtype, value)
    refused(tmp_path, g.encode(), FormatError, "general.alignment .* is not a power of two")


def test_larger_alignment_is_read(src, g, tmp_path):
    """A valid general.alignment moves the data section and the offsets: the reader follows it."""
    g.set("general.alignment", U32, u32(64))
    g.align(64)
    path = tmp_path / "aligned.gguf"
    path.write_bytes(g.encode())
    f = GGUFFile(path)
    assert f.alignment == 64 and f.data_start % 64 == 0
    want = GGUFFile(src / "m.gguf").array("blk.0.ffn_down.weight")[0]
    np.testing.assert_array_equal(f.array("blk.0.ffn_down.weight")[0], want)


# -- tensor table ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_dims", [0, 5, 2**32 - 1])
def test_bad_dimension_count(g, tmp_path, n_dims):
    t = g.tensor("output_norm.weight")
    t[1] = [1] * min(n_dims, 8)
    data = bytearray(g.encode())
    at = data.index(gstr("output_norm.weight"), g.kv_end) + len(gstr("output_norm.weight"))
    struct.pack_into("<I", data, at, n_dims)
    refused(tmp_path, bytes(data), FormatError, f"'output_norm.weight' has {n_dims} dimensions|runs past the end")


@pytest.mark.parametrize(
    "dims, problem",
    [([0, 72], "out of range"), ([2**63, 1], "out of range"), ([2**64 - 1], "out of range"),
     ([2**32, 2**32], "elements, too many"), ([2**21, 2**21, 2**21], "elements, too many"),
     ([2**40, 2**40, 2**40, 2**40], "elements, too many"), ([2**31, 8], "past the end of the data section")],
)
def test_element_counts_that_overflow(g, tmp_path, dims, problem):
    g.tensor("token_embd.weight")[1] = dims
    refused(tmp_path, g.encode(), FormatError, f"'token_embd.weight'.*{problem}")


@pytest.mark.parametrize("offset", [2**20, 2**40, 2**64 - 32])
def test_tensor_data_past_the_end(g, tmp_path, offset):
    g.tensor("output_norm.weight")[3] = offset
    refused(tmp_path, g.encode(), FormatError, "'output_norm.weight': bytes .* run past the end of the data section")


def test_tensor_ending_one_byte_past_the_data(g, tmp_path):
    last = max(g.tensors, key=lambda t: t[3])
    g.data = g.data[: last[3] + 4 * int(np.prod(last[1])) - 1]
    refused(tmp_path, g.encode(), FormatError, f"'{last[0]}': bytes .* run past the end .*truncated")


@pytest.mark.parametrize("delta", [1, 4, 16])
def test_misaligned_offset(g, tmp_path, delta):
    g.tensor("output_norm.weight")[3] += delta
    refused(tmp_path, g.encode(), FormatError, "'output_norm.weight': offset .* is not aligned to 32")


@pytest.mark.parametrize("ttype", [4, 5, 31, 40, 2**32 - 1])
def test_unknown_tensor_type(g, tmp_path, ttype):
    g.tensor("output_norm.weight")[2] = ttype
    refused(tmp_path, g.encode(), UnsupportedModelError, f"'output_norm.weight' has unknown ggml type {ttype}")


def test_known_type_qwen2rt_does_not_load(g, tmp_path):
    g.tensor("output_norm.weight")[2] = 26  # I32: 4 bytes an element like F32, so the sizes still agree
    refused(tmp_path, g.encode(), UnsupportedModelError, "'output_norm.weight' has type I32")


def test_row_not_a_multiple_of_the_block(g, tmp_path):
    g.tensor("output_norm.weight")[2] = 8  # Q8_0 needs rows of 32; the row is 72
    refused(tmp_path, g.encode(), FormatError, "row length 72 is not a multiple of the Q8_0 block size 32")


def test_duplicate_tensor(g, tmp_path):
    g.tensors.append(list(g.tensor("output_norm.weight")))
    refused(tmp_path, g.encode(), FormatError, "'output_norm.weight' appears twice")


def test_overlapping_tensor_data(g, tmp_path):
    a, b = sorted(g.tensors, key=lambda t: t[3])[:2]
    b[3] = a[3]
    refused(tmp_path, g.encode(), FormatError, "tensors .* overlap")


def test_unexpected_tensor_name(g, tmp_path):
    g.tensor("output_norm.weight")[0] = "blk.0.attn_qkv.weight"
    refused(tmp_path, g.encode(), UnsupportedModelError, "unexpected tensor 'blk.0.attn_qkv.weight'")


def test_layer_past_block_count(g, tmp_path):
    g.tensor("blk.0.attn_norm.weight")[0] = "blk.7.attn_norm.weight"
    refused(tmp_path, g.encode(), FormatError, "'model.layers.7.input_layernorm.weight' is past the config's 1 layers")


# -- the tensors against the config ------------------------------------------------------------

def test_tensor_shape_disagrees_with_config(g, tmp_path):
    g.tensor("blk.0.ffn_up.weight")[1] = [72, 86]  # [rows 86, cols 72], the config says 172 rows
    problem = r"'model.layers.0.mlp.up_proj.weight' has shape \[86, 72\], the config implies \[172, 72\]"
    refused(tmp_path, g.encode(), FormatError, problem)


@pytest.mark.parametrize("key", ["qwen2.embedding_length", "qwen2.feed_forward_length", "qwen2.attention.head_count"])
def test_config_disagrees_with_tensors(g, tmp_path, key):
    g.set(key, U32, u32(96))
    refused(tmp_path, g.encode(), Qwen2rtError, "shape|multiple")


@pytest.mark.parametrize(
    "key, vtype, value, problem",
    [
        ("qwen2.block_count", STRING, gstr("one"), "qwen2.block_count must be an integer, got 'one'"),
        ("qwen2.block_count", F32, struct.pack("<f", 1.0), "qwen2.block_count must be an integer, got 1.0"),
        ("qwen2.block_count", U32, u32(0), "'num_hidden_layers' must be an integer >= 1, got 0"),
        ("qwen2.block_count", U64, u64(2**40), "'num_hidden_layers' is 1099511627776, more than qwen2rt supports"),
        ("qwen2.context_length", U64, u64(2**63), "'max_position_embeddings' is 9223372036854775808, more than"),
        ("qwen2.context_length", I32, struct.pack("<i", -1), "'max_position_embeddings' must be an integer >= 1"),
        ("qwen2.embedding_length", U64, u64(2**33), "'hidden_size' is 8589934592, more than qwen2rt supports"),
        ("qwen2.attention.layer_norm_rms_epsilon", F32, struct.pack("<f", float("nan")), "'rms_norm_eps' must be"),
        ("qwen2.attention.layer_norm_rms_epsilon", F32, struct.pack("<f", -1.0), "'rms_norm_eps' must be"),
        ("qwen2.attention.layer_norm_rms_epsilon", 12, struct.pack("<d", 1e-300), "'rms_norm_eps' .* is 0 as a f"),
        ("qwen2.rope.freq_base", F32, struct.pack("<f", float("inf")), "'rope_theta' must be a positive number"),
        ("qwen2.attention.head_count", ARRAY, u32(U32) + u64(1) + u32(12), "head_count must be an integer, got \\["),
        ("qwen2.attention.key_length", U32, u32(2**31), "'head_dim' is 2147483648, more than qwen2rt supports"),
        ("general.architecture", STRING, gstr("llama"), "general.architecture is 'llama'"),
        ("general.architecture", U32, u32(7), "general.architecture is 7"),
    ],
)
def test_bad_config_metadata(g, tmp_path, key, vtype, value, problem):
    g.set(key, vtype, value)
    refused(tmp_path, g.encode(), Qwen2rtError, problem)


def test_missing_config_metadata(g, tmp_path):
    g.kv = [e for e in g.kv if e[0] != "qwen2.block_count"]
    refused(tmp_path, g.encode(), FormatError, "qwen2.block_count is missing")


def test_missing_tensor(g, tmp_path):
    g.tensors = [t for t in g.tensors if t[0] != "blk.0.ffn_down.weight"]
    refused(tmp_path, g.encode(), FormatError, r"missing.*model\.layers\.0\.mlp\.down_proj\.weight")


# -- truncation --------------------------------------------------------------------------------

def test_truncated_everywhere(raw, g, tmp_path):
    """Cut every few bytes through the header, metadata and tensor table, and at points in the data."""
    path = tmp_path / "cut.gguf"
    data_end = g.data_start + max(t[3] + 4 * int(np.prod(t[1])) for t in g.tensors)
    cuts = [*range(64), *range(64, g.table_end + 40, 7), *range(g.data_start, data_end, 4099), data_end - 1]
    for i, cut in enumerate(cuts):
        path.write_bytes(raw[:cut])
        with pytest.raises(FormatError, match=re.escape(str(path))):
            GGUFFile(path)
        if i % 25 == 0 or cut >= g.data_start:  # Model parses the same way: a sample is enough
            with pytest.raises(Qwen2rtError, match=re.escape(str(path))):
                qwen2rt.Model(path)


# -- tokenizer metadata (read at load; a bad one is reported at first use) ---------------------

@pytest.mark.parametrize(
    "key, vtype, value, problem",
    [("tokenizer.ggml.tokens", ARRAY, u32(STRING) + u64(0), "tokenizer.ggml.tokens is empty"),
     ("tokenizer.ggml.tokens", ARRAY, u32(U32) + u64(1) + u32(5), "should be an array of strings"),
     ("tokenizer.ggml.merges", ARRAY, u32(STRING) + u64(1) + gstr("nospace"), "item 0 should be two tokens"),
     ("tokenizer.ggml.merges", ARRAY, u32(STRING) + u64(1) + gstr("zz qq"), "needs the token 'zz'"),
     # both halves are tokens, their join is not: the tokenizers library panics (a BaseException) on this
     ("tokenizer.ggml.merges", ARRAY, u32(STRING) + u64(1) + gstr("Q Z"), "needs the token 'QZ'"),
     ("tokenizer.ggml.token_type", ARRAY, u32(I32) + u64(1) + u32(1), "has 1 entries"),
     ("tokenizer.ggml.eos_token_id", U32, u32(2**32 - 1), "outside the vocabulary"),
     ("tokenizer.ggml.model", STRING, gstr("llama"), "only reads byte-level BPE"),
     ("tokenizer.chat_template", U32, u32(1), "tokenizer.chat_template should be a string")],
)
def test_bad_tokenizer_metadata(g, tmp_path, key, vtype, value, problem):
    g.set(key, vtype, value)
    path = tmp_path / "tok.gguf"
    path.write_bytes(g.encode())
    m = qwen2rt.Model(path)  # the weights load; the tokenizer's error waits for its first use
    with pytest.raises(Qwen2rtError, match=re.escape(str(path)) + ".*(?:" + problem + ")"):
        m.tokenize("hi")


# -- converted qwen2rt folders (test_quantized.py has the newer version, a wrong shape, a missing
# tensor and one truncation) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
    from qwen2rt.converted import convert

    dst = tmp_path_factory.mktemp("converted") / "m-q8"
    convert(str(src), str(dst), dtype="q8", progress=False)
    return dst


@pytest.fixture
def conv(converted, tmp_path):
    """A fresh copy of the converted folder to break."""
    out = tmp_path / "conv"
    shutil.copytree(converted, out)
    return out


def edit_meta(path, **changes):
    """Sets __metadata__ entries; a dict or list value is JSON-encoded as the converter writes them."""
    def fn(h):
        for k, v in changes.items():
            if v is None:
                h["__metadata__"].pop(k)
            else:
                h["__metadata__"][k] = v if isinstance(v, str) else json.dumps(v)
    edit_safetensors_header(path, fn)


def meta_of(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    md = json.loads(raw[8 : 8 + n])["__metadata__"]
    return json.loads(md["qwen2rt_tensor_dtypes"]), json.loads(md["qwen2rt_shapes"])


def test_converted_loads(converted):
    m = qwen2rt.Model(converted)
    assert m.dtype == "q8" and m.forward([1, 2]).shape == (m.config.vocab_size,)


def test_converted_truncated_everywhere(conv):
    p = conv / "model.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    for cut in [0, 3, 8, 9, 100, n // 2, n + 7, n + 8, n + 9, n + 8 + 1000, len(raw) // 2, len(raw) - 1]:
        p.write_bytes(raw[:cut])
        with pytest.raises(FormatError, match=re.escape(str(p))):
            qwen2rt.Model(conv)


UP = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "changes, error, problem",
    [
        ({"qwen2rt_shapes": "{not json"}, FormatError, "qwen2rt metadata is not valid JSON"),
        ({"qwen2rt_tensor_dtypes": "[" * 100000}, FormatError, "qwen2rt metadata is not valid JSON"),
        ({"qwen2rt_shapes": None}, FormatError, "qwen2rt metadata is incomplete"),
        ({"qwen2rt_shapes": [1, 2]}, FormatError, "must be JSON objects"),
        ({"qwen2rt_tensor_dtypes": "null"}, FormatError, "must be JSON objects"),
        ({"qwen2rt_format_version": "abc"}, FormatError, "qwen2rt_format_version 'abc' is not a number"),
        ({"qwen2rt_format_version": "0"}, FormatError, "format version 0 is not valid"),
        ({"qwen2rt_format_version": "-1"}, FormatError, "format version -1 is not valid"),
        ({"qwen2rt_format_version": "9" * 5000}, FormatError, "_format_version '9999.*\\.\\.\\. is not a number"),
        ({"qwen2rt_format_version": "6"}, UnsupportedModelError, "version 6 is newer than this qwen2rt reads"),
        ({"qwen2rt_format_version": None}, FormatError, "qwen2rt_format_version None is not a number"),
        ({"qwen2rt_dtype": "q3"}, FormatError, "qwen2rt_dtype 'q3' is not one of"),
    ],
)
def test_converted_metadata_broken(conv, changes, error, problem):
    p = conv / "model.safetensors"
    edit_meta(p, **changes)
    with pytest.raises(error, match=re.escape(str(p)) + ".*(?:" + problem + ")"):
        qwen2rt.Model(conv)


@pytest.mark.parametrize(
    "dtype, shape, problem",
    [
        ("q3", None, f"tensor '{UP}' has qwen2rt dtype 'q3'"),
        ("gguf:8", None, f"tensor '{UP}' has qwen2rt dtype 'gguf:8'"),  # only an untied embedding may be
        (None, "abc", f"tensor '{UP}' has qwen2rt shape 'abc'"),
        (None, [172], f"tensor '{UP}' has qwen2rt shape \\[172\\]"),
        (None, [0, 72], f"tensor '{UP}' has qwen2rt shape"),
        (None, [172, 72, 1], f"tensor '{UP}' has qwen2rt shape"),
        (None, [2**40, 72], f"tensor '{UP}' has qwen2rt shape"),
        (None, [True, 72], f"tensor '{UP}' has qwen2rt shape"),
        (None, [172, 7200], f"tensor '{UP}' holds .* bytes, its shape \\[172, 7200\\] as q8 needs"),
        ("q4", None, f"tensor '{UP}' holds .* bytes, its shape \\[172, 72\\] as q4 needs"),
        ("f32", None, f"tensor '{UP}' holds .* bytes, its shape \\[172, 72\\] as f32 needs"),
    ],
)
def test_converted_tensor_metadata_wrong(conv, dtype, shape, problem):
    p = conv / "model.safetensors"
    dtypes, shapes = meta_of(p)
    assert dtypes[UP] == "q8" and shapes[UP] == [172, 72]
    if dtype is not None:
        dtypes[UP] = dtype
    if shape is not None:
        shapes[UP] = shape
    edit_meta(p, qwen2rt_tensor_dtypes=dtypes, qwen2rt_shapes=shapes)
    with pytest.raises(FormatError, match=re.escape(str(p)) + ".*(?:" + problem + ")"):
        qwen2rt.Model(conv)


def test_converted_shapes_disagree_with_config(conv):
    """Shapes and bytes agree with each other, not with config.json: refused before the model is built."""
    cfg = json.loads((conv / "config.json").read_text())
    cfg["intermediate_size"] = 2**22
    (conv / "config.json").write_text(json.dumps(cfg))
    path = conv / "model.safetensors"
    with pytest.raises(FormatError, match=re.escape(str(path)) + ".*has shape .* the config implies"):
        qwen2rt.Model(conv)


# -- the JSON files of a folder (test_bad_input.py has a few config.json cases) ----------------

@pytest.fixture
def folder(src, tmp_path):
    out = tmp_path / "folder"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.gguf"))
    return out


@pytest.mark.parametrize(
    "text, problem",
    [(b"", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"), (b"[1, 2]", "expected a JSON object"),
     (b"[" * 100000 + b"]" * 100000, "not valid JSON"), (b'{"model_type": "qwen2"', "not valid JSON"),
     (b"null", "expected a JSON object")],
)
def test_config_json_not_an_object(folder, text, problem):
    (folder / "config.json").write_bytes(text)
    with pytest.raises(FormatError, match=re.escape(str(folder / "config.json")) + ".*(?:" + problem + ")"):
        qwen2rt.Model(folder)


@pytest.mark.parametrize(
    "key, value, error, problem",
    [
        ("hidden_size", 72.0, FormatError, "'hidden_size' must be an integer >= 1, got 72.0"),
        ("hidden_size", "72", FormatError, "'hidden_size' must be an integer"),
        ("hidden_size", True, FormatError, "'hidden_size' must be an integer"),
        ("hidden_size", -72, FormatError, "'hidden_size' must be an integer >= 1, got -72"),
        ("hidden_size", [72], FormatError, "'hidden_size' must be an integer"),
        ("hidden_size", 10**30, UnsupportedModelError, "'hidden_size' is 1000000000000000000000000000000, more than"),
        ("hidden_size", 2**31, UnsupportedModelError, "'hidden_size' is 2147483648, more than qwen2rt supports"),
        ("intermediate_size", 2**22 + 1, UnsupportedModelError, "'intermediate_size' is 4194305, more than"),
        ("vocab_size", 2**24 + 1, UnsupportedModelError, "'vocab_size' is 16777217, more than"),
        ("num_hidden_layers", 10**6, UnsupportedModelError, "'num_hidden_layers' is 1000000, more than"),
        ("num_hidden_layers", 0, FormatError, "'num_hidden_layers' must be an integer >= 1"),
        ("max_position_embeddings", 2**40, UnsupportedModelError, "'max_position_embeddings' is 1099511627776"),
        ("max_position_embeddings", -1, FormatError, "'max_position_embeddings' must be an integer >= 1"),
        ("num_key_value_heads", 0, FormatError, "'num_key_value_heads' must be an integer >= 1"),
        ("head_dim", 3, UnsupportedModelError, "head_dim 3 is odd"),
        ("head_dim", 4096, UnsupportedModelError, "'head_dim' is 4096, more than"),
        ("rms_norm_eps", "1e-6", FormatError, "'rms_norm_eps' must be a positive number, got '1e-6'"),
        ("rms_norm_eps", 1e-300, FormatError, "'rms_norm_eps' 1e-300 is 0 as a float32"),
        ("rms_norm_eps", 1e39, FormatError, "'rms_norm_eps' must be a positive number"),
        ("rms_norm_eps", float("nan"), FormatError, "'rms_norm_eps' must be a positive number, got nan"),
        ("rope_theta", float("inf"), FormatError, "'rope_theta' must be a positive number, got inf"),
        ("rope_theta", 10**400, FormatError, "'rope_theta' must be a positive number, got 1000000"),
        ("rope_theta", 0, FormatError, "'rope_theta' must be a positive number, got 0"),
        ("rope_scaling", "linear", FormatError, "rope parameters must be an object"),
        ("tie_word_embeddings", "yes", FormatError, "tie_word_embeddings must be true or false"),
        ("vocab_size", "x" * 10**6, FormatError, "'vocab_size' must be an integer >= 1, got 'xxx[x]*\\.\\.\\.$"),
    ],
)
def test_config_json_wrong_values(folder, key, value, error, problem):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)  # so that rope_theta and rope_scaling are read
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=re.escape(str(folder / "config.json")) + ".*(?:" + problem + ")"):
        qwen2rt.Model(folder)


def test_config_disagrees_with_every_tensor_before_allocating(folder):
    """A config claiming a huge model next to tiny weights is refused from the safetensors header alone."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hidden_size=2**20, intermediate_size=2**22, num_attention_heads=1024, num_key_value_heads=1024,
               head_dim=1024)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=re.escape(str(folder)) + ".*has shape .*, the config implies"):
        qwen2rt.Model(folder)


@pytest.mark.parametrize(
    "text, problem",
    [
        (b"{not json", "not valid JSON"),
        (b"[1]", "expected a JSON object"),
        (b'{"do_sample": true, "top_k": "many"}', "top_k must be int, got 'many'"),
        (b'{"do_sample": true, "top_k": 1e400}', "top_k must be int"),
        (b'{"do_sample": true, "top_k": 10000000000000}', "top_k 10000000000000 is too large"),
        (b'{"temperature": [0.7]}', "temperature must be int or float"),
        (b'{"temperature": -1}', "temperature must be >= 0"),
        (b'{"top_p": NaN}', "top_p must be in"),
        (b'{"repetition_penalty": 1e999}', "repetition_penalty must be > 0, got inf"),
        (b'{"repetition_penalty": true}', "repetition_penalty must be int or float, got True"),
        (b'{"do_sample": "yes"}', "do_sample must be bool"),
        (b'{"eos_token_id": "<|im_end|>"}', "eos_token_id must be a token id or a list of them"),
        (b'{"eos_token_id": [1, -5]}', "eos_token_id must be a token id"),
        (b'{"eos_token_id": 100000000000000000000}', "eos_token_id must be a token id"),
    ],
)
def test_generation_config_broken(folder, text, problem):
    (folder / "generation_config.json").write_bytes(text)
    with pytest.raises(FormatError, match=re.escape(str(folder / "generation_config.json")) + ".*(?:" + problem + ")"):
        qwen2rt.Model(folder)


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("tokenizer.json", b"[" * 100000 + b"]" * 100000, "invalid JSON: nested too deeply"),
        ("tokenizer.json", b'{"model": 5}', "not a valid tokenizers file"),
        # a merge whose halves are tokens but whose join is not: the tokenizers library panics (a BaseException)
        ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, '
                           b'"merges": ["a b"]}}', "not a valid tokenizers file"),
        ("tokenizer.json", b'{"version": "1.0", "added_tokens": [{"id": 99999999999999999999, "content": "x"}]}',
         "not a valid tokenizers file"),
        ("tokenizer_config.json", b"[" * 100000 + b"]" * 100000, "invalid JSON: nested too deeply"),
        ("tokenizer_config.json", b'{"add_bos_token": "yes"}', "add_bos_token should be true or false"),
        ("tokenizer_config.json", b'{"chat_template": [{"name": 1}]}', "each entry of chat_template"),
        ("tokenizer_config.json", b'{"chat_control_tokens": "x"}', "chat_control_tokens should be a list"),
        ("tokenizer_config.json", b'{"extra_special_tokens": {"image_token": 5}}', "extra_special_tokens.image_token"),
        ("special_tokens_map.json", b"{broken", "invalid JSON at line 1 column 2"),
        ("chat_template.jinja", b"\xff\xfe", "not valid UTF-8 text"),
    ],
)
def test_tokenizer_files_broken(folder, name, text, problem):
    """Read on first use of the tokenizer: the error comes then, naming the file."""
    if name == "special_tokens_map.json":  # read only when tokenizer_config.json has no added_tokens_decoder
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("added_tokens_decoder", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / name).write_bytes(text)
    m = qwen2rt.Model(folder)
    with pytest.raises(FormatError, match=re.escape(str(folder / name)) + ".*(?:" + problem + ")"):
        m.tokenize("hi")


def test_tokenizer_larger_than_the_model(folder):
    cfg = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    first = max(t["id"] for t in tok["added_tokens"]) + 1
    for i in range(first, cfg["vocab_size"] + 1):  # one token more than the model has rows
        tok["added_tokens"].append({"id": i, "content": f"<|extra{i}|>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    m = qwen2rt.Model(folder)
    with pytest.raises(FormatError, match=re.escape(str(folder)) + ".*more than the model's vocab_size"):
        m.tokenize("hi")


# -- no allocation of gigabytes ----------------------------------------------------------------

# Runs in a child process whose address space is capped at 2 GiB above what it uses once qwen2rt
# is imported and a valid model has loaded: each hostile path must fail with a qwen2rt error, and a
# reader that allocated what a header claims would fail with MemoryError (or be killed) instead.
CHILD = textwrap.dedent("""
    import json, resource, sys
    import qwen2rt

    qwen2rt.Model(sys.argv[1], threads=1).forward([1, 2])
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
    out = {}
    for path in sys.argv[2:]:
        try:
            qwen2rt.Model(path, threads=1).tokenize("hi")
            out[path] = "loaded"
        except qwen2rt.Qwen2rtError as e:
            out[path] = type(e).__name__
        except BaseException as e:  # reported, not raised: the parent names the file
            out[path] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
""")


def test_no_gigabyte_allocations(src, raw, converted, tmp_path):
    hostile = {}

    def gguf(name, fn):
        g = Gguf(raw)
        data = fn(g)
        hostile[name] = tmp_path / f"{name}.gguf"
        hostile[name].write_bytes(data if isinstance(data, bytes) else g.encode())

    gguf("tensor-count", lambda g: g.encode(n_tensors=2**40))
    gguf("kv-count", lambda g: g.encode(n_kv=2**62))
    gguf("array", lambda g: g.set("tokenizer.ggml.token_type", ARRAY, u32(U64) + u64(2**28)))  # 2 GiB of items
    gguf("strings", lambda g: g.set("tokenizer.ggml.tokens", ARRAY, u32(STRING) + u64(2**27) + u64(0) * 64))
    gguf("string", lambda g: g.set("general.name", STRING, u64(2**31) + b"x"))
    gguf("dims", lambda g: g.tensor("token_embd.weight").__setitem__(1, [2**20, 2**20]))
    gguf("hidden", lambda g: g.set("qwen2.embedding_length", U32, u32(2**20)))
    gguf("ffn", lambda g: g.set("qwen2.feed_forward_length", U32, u32(2**22)))

    def folder(name, **cfg_changes):
        out = tmp_path / name
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.gguf"))
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(cfg_changes)
        (out / "config.json").write_text(json.dumps(cfg))
        hostile[name] = out
        return out

    # within the C++ limits and the memory check (a GiB of weights), but every buffer the model sizes
    # from hidden_size (256 positions x 2^20 x 4 bytes each) would be reserved before a weight is read
    folder("wide", hidden_size=2**20, num_attention_heads=8, num_key_value_heads=8, head_dim=2)
    folder("long-ffn", intermediate_size=2**22)
    folder("many-layers", num_hidden_layers=4096)
    p = folder("header") / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    conv = tmp_path / "conv"
    shutil.copytree(converted, conv)
    _, shapes = meta_of(conv / "model.safetensors")
    shapes[UP] = [2**22, 72]
    edit_meta(conv / "model.safetensors", qwen2rt_shapes=shapes)
    cfg = json.loads((conv / "config.json").read_text())
    (conv / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 2**22}))
    hostile["converted"] = conv

    got = load_capped(src / "m.gguf", hostile.values())
    expected = ("FormatError", "UnsupportedModelError")
    bad = {name: got[str(p)] for name, p in hostile.items() if got[str(p)] not in expected}
    assert not bad, bad


def load_capped(valid, paths) -> dict[str, str]:
    """path -> the name of the qwen2rt error loading it raised under the cap (or what went wrong)."""
    env = {**os.environ, "QWEN2RT_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(valid), *map(str, paths)],
                       capture_output=True, text=True, timeout=300, check=False, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_consistent_small_model_asking_for_terabytes(src, tmp_path):
    """A 10 MB folder whose config and tensors agree: 2^19 query heads on one KV head and 2^24 positions ask
    the C++ for 2^19 x 2^24 floats of attention scratch. It should end in OutOfMemoryError."""
    from safetensors.numpy import save_file

    out = tmp_path / "heads"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.gguf", "*.safetensors", "config.json"))
    cfg = json.loads((src / "config.json").read_text())
    V, H, FF, QD, KVD = cfg["vocab_size"], 2, 2, 2**20, 2
    cfg.update(hidden_size=H, intermediate_size=FF, num_attention_heads=QD // 2, num_key_value_heads=1, head_dim=2,
               max_position_embeddings=2**24, tie_word_embeddings=True)
    (out / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for name, shape in [("input_layernorm.weight", (H,)), ("post_attention_layernorm.weight", (H,)),
                        ("self_attn.q_proj.weight", (QD, H)), ("self_attn.q_proj.bias", (QD,)),
                        ("self_attn.k_proj.weight", (KVD, H)), ("self_attn.k_proj.bias", (KVD,)),
                        ("self_attn.v_proj.weight", (KVD, H)), ("self_attn.v_proj.bias", (KVD,)),
                        ("self_attn.o_proj.weight", (H, QD)), ("mlp.gate_proj.weight", (FF, H)),
                        ("mlp.up_proj.weight", (FF, H)), ("mlp.down_proj.weight", (H, FF))]:
        shapes["model.layers.0." + name] = shape
    save_file({k: np.full(v, 0.01, np.float16) for k, v in shapes.items()}, out / "model.safetensors")
    got = load_capped(src / "m.gguf", [out])
    assert got[str(out)] == "OutOfMemoryError", got


# -- what the fuzzer (test_fuzz.py) found, kept as plain cases ---------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    make_checkpoint(folder, shape="mha", layers=1, max_position_embeddings=64, shard=True)
    return folder


@pytest.mark.parametrize("shard", ["\0", "a\0b.safetensors", "sub", "config.json", ["x"]])
def test_shard_names_that_are_not_shards(sharded, tmp_path, shard):
    folder = tmp_path / "sharded"
    shutil.copytree(sharded, folder)
    (folder / "sub").mkdir()
    p = folder / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    p.write_text(json.dumps(index))
    with pytest.raises(FormatError, match=re.escape(str(folder)) + ".*(not a file|too short|header|shard name)"):
        qwen2rt.Model(folder)


def test_safetensors_dtype_not_a_string(folder):
    p = folder / "model.safetensors"
    edit_safetensors_header(p, lambda h: h[next(k for k in h if k != "__metadata__")].update(dtype=["F32"]))
    with pytest.raises(FormatError, match=re.escape(str(p)) + r".*unknown dtype \['F32'\]"):
        qwen2rt.Model(folder)


def test_tokenizer_class_not_a_string(folder):
    p = folder / "tokenizer_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "tokenizer_class": []}))
    with pytest.raises(FormatError, match=re.escape(str(p)) + ".*tokenizer_class should be a string"):
        qwen2rt.Model(folder).tokenize("hi")


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_json_file_that_is_a_folder(folder, name):
    os.remove(folder / name)
    (folder / name).mkdir()
    with pytest.raises(FormatError, match=re.escape(str(folder / name)) + ".*cannot be read"):
        qwen2rt.Model(folder)


def test_pipes_are_not_read(folder, tmp_path):
    """Opening a FIFO blocks until a writer comes: a path or a JSON file that is one is refused unread."""
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(UnsupportedModelError, match=re.escape(str(fifo)) + ".*not a regular file"):
        qwen2rt.Model(fifo)
    os.remove(folder / "config.json")
    os.mkfifo(folder / "config.json")
    with pytest.raises(FormatError, match=re.escape(str(folder / "config.json")) + ".*not a regular file"):
        qwen2rt.Model(folder)
