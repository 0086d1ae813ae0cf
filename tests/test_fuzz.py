"""Fuzzing every loader: small valid files of each format, mutated at random, must load or fail with
a qwen2rt error (Qwen2rtError) — never another exception, a crash or a hang.

Each format starts from a one-layer tiny model built once per module; hypothesis mutates one file
(flipped bits, 1/2/4/8-byte integers overwritten with boundary values, JSON values replaced,
truncation, inserted or deleted bytes), mostly in the header and metadata, where the parsers work;
the data region only gives garbage numbers. A model that loads must also run two tokens and
tokenize a word, each either working or raising Qwen2rtError.

CI runs a few examples per format (derandomized, the same every run). The longer run, with fresh
random examples each time:

    QWEN2RT_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import pytest
import qwen2rt
from hypothesis import HealthCheck, configuration, given, settings
from hypothesis import strategies as st
from qwen2rt import Qwen2rtError
from qwen2rt.converted import convert
from tiny_model import make_checkpoint, write_gguf

# hypothesis caches what it learns under ./.hypothesis even with no database: keep that out of the checkout
configuration.set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "qwen2rt-hypothesis"))
EXAMPLES = int(os.environ.get("QWEN2RT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis folder in the repo
    derandomize="QWEN2RT_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HANG_SECONDS = 30  # one load, forward and tokenize of a tiny model take milliseconds

# -- mutations ---------------------------------------------------------------------------------

BOUNDARY = [0, 1, 2, 7, 8, 31, 32, 33, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62,
            2**63 - 1, 2**63, 2**64 - 1, -1, -2**31, -2**63]


def integers_at(offsets: st.SearchStrategy):
    """An integer field overwritten: ('int', offset, width, value)."""
    value = st.one_of(st.sampled_from(BOUNDARY), st.integers(-(2**63), 2**64 - 1))
    return st.tuples(st.just("int"), offsets, st.sampled_from([1, 2, 4, 8]), value)


def byte_mutation(hot: int, size: int, fields: list[int] | None = None):
    """One mutation of a file of `size` bytes; offsets fall in the first `hot` bytes two times in three."""
    def spread(n):  # hypothesis favours small integers: scatter them over the range (0 stays 0 when shrinking)
        return st.integers(0, n - 1).map(lambda x: x * 2654435761 % n)

    offsets = st.one_of(spread(hot), spread(hot), spread(size))
    ints = integers_at(st.sampled_from(fields)) if fields else integers_at(offsets)
    return st.one_of(
        ints,
        ints,
        st.tuples(st.just("flip"), offsets, st.integers(0, 7)),
        st.tuples(st.just("byte"), offsets, st.integers(0, 255)),
        st.tuples(st.just("truncate"), offsets),
        st.tuples(st.just("insert"), offsets, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), offsets, st.integers(1, 16)),
    )


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for m in mutations:
        kind, at = m[0], min(m[1], max(len(out) - 1, 0))
        if kind == "int":
            width, value = m[2], m[3] % (1 << (8 * m[2]))
            out[at : at + width] = value.to_bytes(width, "little")[: max(len(out) - at, 0)]
        elif kind == "flip" and out:
            out[at] ^= 1 << m[2]
        elif kind == "byte" and out:
            out[at] = m[2]
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = m[2]
        elif kind == "delete":
            del out[at : at + m[2]]
    return bytes(out)


# JSON values that break parsers: wrong types, boundary and non-finite numbers, deep or long values
JSON_VALUES = st.one_of(
    st.sampled_from(BOUNDARY),
    st.sampled_from([None, True, False, 0.5, -0.0, 1e308, -1e308, float("nan"), float("inf"), 10**400, "", "x" * 5000,
                     "F32", "U8", "BF16", "I64", "q8", "q4", "f32", [], {}, [0], [1, 2, 3], [2**63, 2**63], [-1, 5]]),
    st.integers(),
    st.text(max_size=8),
    st.lists(st.integers(-2, 2**33), max_size=4),
)


def json_leaves(value, path=()):
    """Paths to every value inside a JSON document (objects and lists included)."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:64]):  # a vocabulary's 500 entries: the first few are enough
            yield from json_leaves(v, (*path, i))


def json_mutation(doc):
    """('json', path index, action, value): replace or delete a value, or rename a key."""
    n = sum(1 for _ in json_leaves(doc))
    return st.tuples(st.just("json"), st.integers(0, n - 1), st.sampled_from(["set", "set", "delete", "rename"]),
                     JSON_VALUES)


def mutate_json(doc, mutations):
    doc = copy.deepcopy(doc)
    for _, index, action, value in mutations:
        value = copy.deepcopy(value)  # sampled values are shared between examples: never alias them
        paths = list(json_leaves(doc))
        path = paths[index % len(paths)]
        if not path:
            doc = value if action == "set" else doc
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if action == "set":
            parent[key] = value
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[key + "_"] = parent.pop(key)
    return doc


def dump(doc) -> bytes:
    return json.dumps(doc).encode()


# -- the check ---------------------------------------------------------------------------------

class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"no answer in {HANG_SECONDS} s")


def must_load_or_refuse(path):
    """Model(path) works or raises Qwen2rtError; so do a forward on 2 tokens and tokenizing a word.
    Anything else propagates, and hypothesis reports it with the mutations that caused it."""
    try:
        _load_run_tokenize(path)
    except (Exception, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        # a panic in a Rust library (pyo3's PanicException) is a BaseException, which hypothesis would
        # pass through without shrinking or reporting the example: make it a plain failure
        raise AssertionError(f"{type(e).__name__}: {e}") from e


def _load_run_tokenize(path):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        try:
            m = qwen2rt.Model(path, threads=1)
        except Qwen2rtError:
            return
        for step in (lambda: m.forward([1, 2]), lambda: m.tokenize("hi")):
            try:
                step()
            except Qwen2rtError:
                pass
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """name -> path of a valid tiny model in each format."""
    root = tmp_path_factory.mktemp("fuzz-base")
    single = root / "single"
    model = make_checkpoint(single, shape="mha", layers=1, max_position_embeddings=32)
    make_checkpoint(root / "sharded", shape="mha", layers=1, max_position_embeddings=32, shard=True)
    write_gguf(root / "m.gguf", model, single, "F32")
    convert(str(single), str(root / "converted"), dtype="q4", progress=False)
    paths = {"single": single, "sharded": root / "sharded", "gguf": root / "m.gguf", "converted": root / "converted"}
    for p in paths.values():
        qwen2rt.Model(p, threads=1).forward([1, 2])  # valid to begin with
    return paths


@pytest.fixture
def scratch(base):
    """A function: name -> a fresh copy of that base model (the previous copy is removed)."""
    root = tempfile.mkdtemp(prefix="qwen2rt-fuzz-")

    def copy(name):
        dst = os.path.join(root, "m")
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        elif os.path.exists(dst):
            os.remove(dst)
        src = base[name]
        return Path(shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst))

    yield copy
    shutil.rmtree(root, ignore_errors=True)


def rewrite(path, fn):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(fn(data))


# -- safetensors -------------------------------------------------------------------------------

def split_safetensors(data: bytes):
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header, body: bytes, align: int = 8) -> bytes:
    raw = dump(header)
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw + body


def safetensors_mutations(path):
    data = Path(path).read_bytes()
    header, _ = split_safetensors(data)
    hot = 8 + struct.unpack_from("<Q", data)[0]
    return st.one_of(
        st.tuples(st.just("header"), st.lists(json_mutation(header), min_size=1, max_size=3)),
        st.tuples(st.just("bytes"), st.lists(byte_mutation(hot, len(data), [0, 4]), min_size=1, max_size=3)),
    )


def apply_safetensors(data: bytes, mutation, align: int = 8) -> bytes:
    kind, muts = mutation
    if kind == "bytes":
        return mutate(data, muts)
    header, body = split_safetensors(data)
    return join_safetensors(mutate_json(header, muts), body, align)


def test_fuzz_single_safetensors(base, scratch):
    @FUZZ
    @given(data=st.data())
    def run(data):
        folder = scratch("single")
        mutation = data.draw(safetensors_mutations(base["single"] / "model.safetensors"))
        rewrite(folder / "model.safetensors", lambda raw: apply_safetensors(raw, mutation))
        must_load_or_refuse(folder)

    run()


def test_fuzz_sharded_safetensors(base, scratch):
    index = json.loads((base["sharded"] / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1

    @FUZZ
    @given(data=st.data())
    def run(data):
        folder = scratch("sharded")
        if data.draw(st.booleans()):
            muts = data.draw(st.lists(json_mutation(index), min_size=1, max_size=3))
            (folder / "model.safetensors.index.json").write_bytes(dump(mutate_json(index, muts)))
        else:
            shard = data.draw(st.sampled_from(shards))
            mutation = data.draw(safetensors_mutations(base["sharded"] / shard))
            rewrite(folder / shard, lambda raw: apply_safetensors(raw, mutation))
        must_load_or_refuse(folder)

    run()


# -- GGUF --------------------------------------------------------------------------------------

def gguf_fields(data: bytes) -> tuple[list[int], int]:
    """Offsets of the integer fields (counts, lengths, types, dims, offsets) and the end of the tensor
    table: where mutations hurt a parser most."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fields = [4, 8, 16]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos):
        fields.append(pos)
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]

    def value(pos, vtype, first=True):
        if vtype in sizes:
            if first:
                fields.append(pos)
            return pos + sizes[vtype]
        if vtype == 8:
            return string(pos) if first else pos + 8 + struct.unpack_from("<Q", data, pos)[0]
        itype, n = struct.unpack_from("<IQ", data, pos)
        fields.extend([pos, pos + 4])
        pos += 12
        if itype in sizes:
            return pos + n * sizes[itype]
        for i in range(n):
            pos = value(pos, itype, first=i < 4)  # the first few strings of a long array
        return pos

    for _ in range(n_kv):
        pos = string(pos)
        fields.append(pos)
        pos = value(pos + 4, struct.unpack_from("<I", data, pos)[0])
    for _ in range(n_tensors):
        pos = string(pos)
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append(pos)  # n_dims
        fields.extend(pos + 4 + 8 * i for i in range(n_dims))  # the dims
        pos += 4 + 8 * n_dims
        fields.extend([pos, pos + 4])  # type, offset
        pos += 12
    return sorted(set(fields)), pos


def test_fuzz_gguf(base, scratch):
    raw = base["gguf"].read_bytes()
    fields, table_end = gguf_fields(raw)

    @FUZZ
    @given(muts=st.lists(byte_mutation(table_end, len(raw), fields), min_size=1, max_size=4))
    def run(muts):
        path = scratch("gguf")
        rewrite(path, lambda data: mutate(data, muts))
        must_load_or_refuse(path)

    run()


# -- converted qwen2rt folder ------------------------------------------------------------------

def test_fuzz_converted(base, scratch):
    st_path = base["converted"] / "model.safetensors"
    header, _ = split_safetensors(st_path.read_bytes())
    inner = {k: json.loads(header["__metadata__"][k]) for k in ("qwen2rt_tensor_dtypes", "qwen2rt_shapes")}

    @FUZZ
    @given(data=st.data())
    def run(data):
        folder = scratch("converted")
        if data.draw(st.booleans()):  # the JSON inside the metadata strings
            key = data.draw(st.sampled_from(sorted(inner)))
            muts = data.draw(st.lists(json_mutation(inner[key]), min_size=1, max_size=3))

            def fn(raw):
                h, body = split_safetensors(raw)
                h["__metadata__"][key] = json.dumps(mutate_json(inner[key], muts))
                return join_safetensors(h, body, align=64)
        else:
            mutation = data.draw(safetensors_mutations(st_path))

            def fn(raw):
                return apply_safetensors(raw, mutation, align=64)

        rewrite(folder / "model.safetensors", fn)
        must_load_or_refuse(folder)

    run()


# -- the JSON files: config.json, generation_config.json, the tokenizer files ------------------

@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json"])
def test_fuzz_json_files(base, scratch, name):
    text = (base["single"] / name).read_bytes()
    doc = json.loads(text)

    @FUZZ
    @given(data=st.data())
    def run(data):
        folder = scratch("single")
        if data.draw(st.integers(0, 3)):
            out = dump(mutate_json(doc, data.draw(st.lists(json_mutation(doc), min_size=1, max_size=3))))
        else:
            out = mutate(text, data.draw(st.lists(byte_mutation(len(text), len(text)), min_size=1, max_size=3)))
        (folder / name).write_bytes(out)
        must_load_or_refuse(folder)

    run()
