"""q8 / q6 / q4 models: against PyTorch, across ISA paths, and converted folders that load by mmap."""

import json

import numpy as np
import pytest
import torch

import qwen2rt
from qwen2rt import FormatError, InvalidInputError, UnsupportedModelError
from isa_paths import TILE_ISAS, TILE_ISAS_HERE, logits_per_isa
from tiny_model import edit_safetensors_header, make_checkpoint, unpack_bf16, write_tiny_tokenizer


@pytest.fixture(scope="module", params=["q32", "gqa"])
def ckpt(request, tmp_path_factory):
    """q32 has rows of 32-multiples; gqa's hidden size 84 exercises the zero-padded K tail."""
    folder = tmp_path_factory.mktemp(f"quant-{request.param}")
    ref = make_checkpoint(folder, shape=request.param, seed=11, tie=request.param == "gqa")
    return folder, ref


def torch_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


# Relative logit error and top-1 agreement the formats must reach on the random tiny models.
BOUNDS = {"q8": (0.03, 0.95), "q6": (0.08, 0.85), "q4": (0.25, 0.6)}


@pytest.mark.parametrize("dtype", ["q8", "q6", "q4"])
def test_quantized_close_to_pytorch(ckpt, dtype, isa):
    folder, ref = ckpt
    ids = np.random.default_rng(3).integers(0, ref.config.vocab_size, 48).tolist()
    want = torch_logits(ref, ids)
    m = qwen2rt.Model(folder, dtype=dtype)
    got = m.forward(ids, all_logits=True)
    rel = np.abs(got - want).max() / np.abs(want).max()
    top1 = (got.argmax(-1) == want.argmax(-1)).mean()
    assert rel < BOUNDS[dtype][0] and top1 > BOUNDS[dtype][1], (rel, top1)


@pytest.mark.parametrize("tiles", TILE_ISAS_HERE)
@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_amx_tiles_close_to_pytorch_and_vnni(ckpt, dtype, tiles):
    """The prefill of q8 / q4 on AMX tiles (or their emulation, kernels_amx.cpp): weights rounded to
    bf16 on top of their quantization, tokens to bf16 instead of int8, on 2 threads. Within the format's bounds
    of PyTorch, and near the VNNI kernels: these random models amplify any rounding difference
    (measured 0.8e-2 to 1.6e-2 here, as a last-bit difference does in test_isa_paths_agree); a wrong
    tile is off by O(1). tests/test_real_weights.py measures the real model's KL."""
    folder, ref = ckpt
    ids = np.random.default_rng(3).integers(0, ref.config.vocab_size, 48).tolist()
    want = torch_logits(ref, ids)
    out = logits_per_isa(("avx512", tiles), lambda: qwen2rt.Model(folder, dtype=dtype, threads=2), ids)
    got = out[tiles]
    rel = np.abs(got - want).max() / np.abs(want).max()
    top1 = (got.argmax(-1) == want.argmax(-1)).mean()
    assert rel < BOUNDS[dtype][0] and top1 > BOUNDS[dtype][1], (rel, top1)
    vnni = out["avx512"]
    between = np.abs(got - vnni).max() / np.abs(vnni).max()
    assert 0 < between < 5e-2, between


@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_decode_equals_prefill(ckpt, dtype):
    folder, ref = ckpt
    ids = np.random.default_rng(4).integers(0, ref.config.vocab_size, 30).tolist()
    m = qwen2rt.Model(folder, dtype=dtype)
    full = m.forward(ids, all_logits=True)
    m.reset()
    rows = [m.forward(ids[:10], all_logits=True)]
    rows += [m.forward([t], start_pos=i)[None] for i, t in enumerate(ids) if i >= 10]
    # on AMX the 30-token prompt runs on bf16 tiles and the rest on the integer kernels: the rounding
    # bound of test_amx_tiles_close_to_pytorch_and_vnni
    tol = 5e-2 if qwen2rt._core.active_isa() in TILE_ISAS else 1e-5
    np.testing.assert_allclose(np.concatenate(rows), full, rtol=0, atol=tol * np.abs(full).max())


@pytest.fixture(scope="module", params=["gqa", "k256"])
def shapes(request, tmp_path_factory):
    """gqa's head groups (7 heads of 6) are not whole int8 blocks of 32; k256's (4 of 32) are."""
    folder = tmp_path_factory.mktemp(f"threads-{request.param}")
    make_checkpoint(folder, shape=request.param, seed=17, layers=2)
    return folder


@pytest.mark.parametrize("dtype", ["f32", "bf16", "q8", "q4"])
def test_thread_counts_agree(shapes, dtype):
    """A prompt, a decode step and a batch of three decode steps give the logits of one thread on
    3 and 4 threads. On more threads than rows every thread norms the rows for itself and adds the
    residual of the columns it computed; on fewer, the team shares the rows out. The attention
    output and the MLP's hidden rows are quantized by the threads that made them. The prompt's 20
    rows are enough (kClaimRows) for its q8 / q4 matrices' rows to go out in claimed units."""
    ids = np.random.default_rng(6).integers(0, 100, 20).tolist()
    out = {}
    for th in (1, 3, 4):
        m = qwen2rt.Model(shapes, dtype=dtype, threads=th, kv_dtype="f32")
        core = m._core
        core.set_sequences(3)
        rows = [m.forward(ids, all_logits=True)]
        rows.append(m.forward([7], start_pos=len(ids))[None])  # 1 row
        for s in (1, 2):
            core.forward(np.array(ids[: 5 + s], np.int32), 0, False, s)
        rows.append(core.decode_batch(np.array([8, 9, 10], np.int32), np.array([0, 1, 2], np.int32)))  # 3 rows
        out[th] = np.concatenate(rows)
    for th in (3, 4):
        np.testing.assert_allclose(out[th], out[1], rtol=0, atol=1e-5 * np.abs(out[1]).max(), err_msg=f"{th} threads")


@pytest.mark.parametrize("dtype", ["q8", "q6", "q4"])
def test_isa_paths_agree(ckpt, dtype):
    from qwen2rt import _core

    folder, ref = ckpt
    ids = np.random.default_rng(5).integers(0, ref.config.vocab_size, 20).tolist()
    # the integer kernels' paths (the tiles round to bf16: test_amx_tiles_close_to_pytorch_and_vnni);
    # one cache type for all (q4's default depends on the ISA at load)
    isas = [i for i in _core.available_isas() if i not in TILE_ISAS]
    outs = logits_per_isa(isas, lambda: qwen2rt.Model(folder, dtype=dtype, kv_dtype="f16"), ids)
    # Activations are rounded to int8 before each matmul, so a last-bit difference upstream (the ISAs
    # sum in different orders) can move one value across a rounding boundary and that row's logits by
    # ~1e-2: one such row of 20 is let through. A kernel that disagrees shows in many rows.
    base = outs["generic"]
    for isa, out in outs.items():
        err = np.abs(out - base).max(axis=1) / np.abs(base).max()
        assert np.sum(err > 1e-4) <= 1 and err.max() < 2e-2, (isa, err)


def test_q4_keeps_lm_head_in_q6_and_v_proj_in_q8(ckpt):
    folder, ref = ckpt
    m = qwen2rt.Model(folder, dtype="q4")
    assert m._core.tensor_bytes("model.layers.0.mlp.up_proj.weight")[0] == "q4"
    assert m._core.tensor_bytes("model.layers.0.self_attn.v_proj.weight")[0] == "q8"
    head = "model.embed_tokens.weight" if ref.config.tie_word_embeddings else "lm_head.weight"
    assert m._core.tensor_bytes(head)[0] == "q6"
    pure = qwen2rt.Model(folder, dtype="q4", dtype_overrides={"lm_head": "q4", "v_proj": "q4"})
    assert pure._core.tensor_bytes(head)[0] == "q4"
    assert pure._core.weight_bytes < m._core.weight_bytes
    wide = qwen2rt.Model(folder, dtype="q4", dtype_overrides={"lm_head": "q8"})
    assert wide._core.tensor_bytes(head)[0] == "q8"
    assert wide._core.weight_bytes > m._core.weight_bytes
    with pytest.raises(InvalidInputError):
        qwen2rt.Model(folder, dtype="q4", dtype_overrides={"lm_head": "q3"})


# -- converted folders -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(ckpt, tmp_path_factory):
    from qwen2rt.converted import convert

    folder, ref = ckpt
    dst = tmp_path_factory.mktemp("converted") / "m-q4"
    convert(str(folder), str(dst), dtype="q4", progress=False)
    return folder, dst


def test_converted_equals_on_the_fly(converted):
    src, dst = converted
    ids = list(range(3, 40))
    a = qwen2rt.Model(src, dtype="q4").forward(ids, all_logits=True)
    m = qwen2rt.Model(dst)
    assert m.dtype == "q4"
    b = m.forward(ids, all_logits=True)
    np.testing.assert_array_equal(a, b)
    assert m.tokenize("def f(x): 中文") == qwen2rt.Model(src).tokenize("def f(x): 中文")
    msgs = [{"role": "user", "content": "hi"}]
    assert m.apply_chat_template(msgs) == qwen2rt.Model(src).apply_chat_template(msgs)
    assert m.eos_token_ids == qwen2rt.Model(src).eos_token_ids


def test_converted_format_version_is_the_lowest_that_reads_it(converted, tmp_path):
    """A q4 folder holds its lm_head in q6, which format version 5 brought: an older qwen2rt then says
    to upgrade instead of failing on the tensor; a q8 folder stays readable by version 1."""
    from qwen2rt.converted import convert
    from qwen2rt.safetensors_io import SafetensorsFile

    src, dst = converted
    md = SafetensorsFile(dst / "model.safetensors").metadata
    assert md["qwen2rt_format_version"] == "5" and "q6" in json.loads(md["qwen2rt_tensor_dtypes"]).values()
    convert(str(src), str(tmp_path / "q8"), dtype="q8", progress=False)
    assert SafetensorsFile(tmp_path / "q8" / "model.safetensors").metadata["qwen2rt_format_version"] == "1"


def test_converted_is_mapped_not_copied(converted):
    src, dst = converted
    m = qwen2rt.Model(dst)
    data = m._core.tensor_bytes("model.layers.1.mlp.down_proj.weight")[1]
    # the matrix points into the mapped file: its memory is not owned by a numpy array or the heap
    raw = (dst / "model.safetensors").read_bytes()
    assert data.tobytes() in raw
    assert not data.flags.writeable


def test_converted_copied_when_not_borrowed(converted, monkeypatch):
    # set_tensor(may_borrow=False) copies a packed matrix: its bytes, not rows x cols elements (that
    # overran the buffer and crashed)
    from qwen2rt import _core

    src, dst = converted
    mapped = qwen2rt.Model(dst)

    class Copying(_core.Qwen2Model):
        def set_tensor(self, name, array, src_dtype, shape, dtype=None):
            return super().set_tensor(name, array, src_dtype, shape, may_borrow=False, dtype=dtype)

    monkeypatch.setattr(qwen2rt.model._core, "Qwen2Model", Copying)
    copied = qwen2rt.Model(dst)
    name = "model.layers.1.mlp.down_proj.weight"
    a, b = mapped._core.tensor_bytes(name)[1], copied._core.tensor_bytes(name)[1]
    assert a.ctypes.data != b.ctypes.data
    np.testing.assert_array_equal(a, b)
    ids = list(range(3, 30))
    np.testing.assert_array_equal(mapped.forward(ids, all_logits=True), copied.forward(ids, all_logits=True))


LAYER_MATRICES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("dtype", ["q4", "q8", "bf16"])  # f32 from f32 files is borrowed, not made
def test_small_matrices_made_at_load_are_packed(ckpt, dtype):
    # back to back in the model's weight arena (blocks of 2 MiB pages), none overlapping; set again,
    # a matrix is made in its own room again
    folder, ref = ckpt
    m = qwen2rt.Model(folder, dtype=dtype)
    names = [f"model.layers.{layer}.{name}.weight" for layer in range(ref.config.num_hidden_layers)
             for name in LAYER_MATRICES]
    spans = sorted((d.ctypes.data, d.ctypes.data + -(-d.size // 64) * 64)
                   for d in (m._core.tensor_bytes(n)[1] for n in names))
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
    before = m.forward(list(range(3, 20)), all_logits=True)
    name = names[-3]  # a gate_proj
    shape = (ref.config.intermediate_size, ref.config.hidden_size)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    where = m._core.tensor_bytes(name)[1].ctypes.data
    m._core.set_tensor(name, w, "f32", list(w.shape), dtype=m._core.tensor_bytes(name)[0])
    assert m._core.tensor_bytes(name)[1].ctypes.data == where
    m.reset()
    assert not np.allclose(m.forward(list(range(3, 20)), all_logits=True), before)


def _pack_bf16_groups8(rows_major, rows, cols):
    """Row-major bf16 bits in format version 3's layout: groups of 8 rows, blocks of 32 columns."""
    g, b = -(-rows // 8), -(-cols // 32)
    padded = np.zeros((g * 8, b * 32), np.uint16)
    padded[:rows, :cols] = rows_major
    return np.ascontiguousarray(padded.reshape(g, 8, b, 32).transpose(0, 2, 1, 3)).ravel()


def test_converted_bf16_is_packed_and_older_layouts_still_load(ckpt, tmp_path):
    from qwen2rt.converted import convert
    from qwen2rt.safetensors_io import SafetensorsFile

    folder, ref = ckpt
    dst = tmp_path / "m-bf16"
    convert(str(folder), str(dst), dtype="bf16", progress=False)
    f = SafetensorsFile(dst / "model.safetensors")
    md = f.metadata
    kinds, shapes = json.loads(md["qwen2rt_tensor_dtypes"]), json.loads(md["qwen2rt_shapes"])
    assert md["qwen2rt_format_version"] == "4"
    name = "model.layers.0.mlp.gate_proj.weight"
    assert kinds[name] == "bf16p32"
    want = ref.model.layers[0].mlp.gate_proj.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(unpack_bf16(f.array(name).view(np.uint16), *shapes[name]), want.view(np.uint16))

    # the same weights as format versions 1 and 2 stored bf16 (row-major) and as version 3 did (groups
    # of 8 rows): packed again at load, to the same logits
    def rewrite(version, kind, layout):
        header, blobs, offset, new_kinds = {}, [], 0, dict(kinds)
        for t in f.names():
            data = f.array(t).view(np.uint8)
            if kinds[t] == "bf16p32":
                rows_major = np.ascontiguousarray(unpack_bf16(f.array(t).view(np.uint16), *shapes[t]))
                data = np.ascontiguousarray(layout(rows_major, *shapes[t])).view(np.uint8).ravel()
                new_kinds[t] = kind
            f32 = new_kinds[t] == "f32"
            header[t] = {"dtype": "F32" if f32 else "U8", "shape": [data.size // (4 if f32 else 1)],
                         "data_offsets": [offset, offset + data.size]}
            blobs.append(data.tobytes())
            offset += data.size
        header["__metadata__"] = {**md, "qwen2rt_format_version": version,
                                  "qwen2rt_tensor_dtypes": json.dumps(new_kinds)}
        raw = json.dumps(header).encode()
        raw += b" " * (-(8 + len(raw)) % 64)
        old = tmp_path / f"m-bf16-v{version}"
        old.mkdir()
        for other in dst.iterdir():
            if other.name != "model.safetensors":
                (old / other.name).write_bytes(other.read_bytes())
        (old / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))
        return old

    ids = list(range(3, 30))
    a = qwen2rt.Model(dst).forward(ids, all_logits=True)
    v1 = rewrite("1", "bf16", lambda r, rows, cols: r)
    v3 = rewrite("3", "bf16p", _pack_bf16_groups8)
    np.testing.assert_array_equal(qwen2rt.Model(v1).forward(ids, all_logits=True), a)
    np.testing.assert_array_equal(qwen2rt.Model(v3).forward(ids, all_logits=True), a)
    np.testing.assert_array_equal(qwen2rt.Model(folder, dtype="bf16").forward(ids, all_logits=True), a)


def test_write_in_huge_pages():
    from qwen2rt.converted import HUGE_PAGE, write_in_huge_pages

    class File:
        def __init__(self):
            self.writes, self.data = [], bytearray()

        def write(self, view):
            n = min(len(view), 3 << 20)  # a write may take less than it was given
            self.writes.append((len(self.data), n))
            self.data += bytes(view[:n])
            return n

    rng = np.random.default_rng(0)
    parts = [b"header", np.zeros(0, np.uint8), rng.integers(0, 255, 5_000_000, dtype=np.uint8),
             rng.integers(0, 255, 100, dtype=np.uint8), np.arange(1_500_000, dtype=np.float32), b"tail"]
    f, done = File(), []
    write_in_huge_pages(f, parts, done.append)
    assert bytes(f.data) == b"".join(bytes(memoryview(p).cast("B")) for p in parts)
    assert all(at % HUGE_PAGE == 0 and n == HUGE_PAGE for at, n in f.writes[:-1]), f.writes
    assert done == [1, 2, 3, 4]


def _vm_flags(address):
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


def test_weights_mapped_asking_for_huge_pages(tmp_path):
    import mmap

    from safetensors.numpy import save_file

    from qwen2rt.safetensors_io import SafetensorsFile

    if not hasattr(mmap, "MADV_HUGEPAGE") or _vm_flags(id(tmp_path)) is None:
        pytest.skip("no madvise(MADV_HUGEPAGE) or no /proc/self/smaps")
    save_file({"a": np.zeros(3_000_000, np.float32), "b": np.ones(3_000_000, np.float32)},
              str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(tmp_path / "t.safetensors")
    a, b = f.array("a"), f.array("b")
    assert "hg" in _vm_flags(a.ctypes.data + 4096)
    # an evicted tensor's pages (an untied embedding, read a row at a time) come back 4 KiB at a time
    f.evict("a")
    assert "nh" in _vm_flags(a.ctypes.data + 4096)
    assert "hg" in _vm_flags(b.ctypes.data + 4096)


def _cache_in_small_pages(path):
    """Leaves a file's page cache in 4 KiB folios: written out, dropped, and read again 4 KiB at a
    time with readahead off (as a reader that never asked for huge pages may leave it)."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for at in range(0, os.path.getsize(path), 4096):
            os.pread(fd, 4096, at)
    finally:
        os.close(fd)


def _large_folio_filesystem(path):
    """ext4 and xfs cache files in large folios from Linux 6.16 on."""
    import os

    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    best, fs = "", None
    with open("/proc/mounts") as f:
        for line in f:
            mount, kind = line.split()[1:3]
            if os.path.realpath(path).startswith(mount) and len(mount) >= len(best):
                best, fs = mount, kind
    return fs in ("ext4", "xfs") and release >= (6, 16)


def test_small_pages_read_again_as_huge_pages(tmp_path):
    """Mapped weights that the page cache holds in 4 KiB folios are read again as 2 MiB pages
    (a decode reads 4 KiB pages with a TLB miss and a stopped prefetcher each), and read the same."""
    import mmap
    import os

    from safetensors.numpy import save_file

    from qwen2rt.safetensors_io import HUGE_PAGE, SafetensorsFile, small_page_ranges

    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(os, "posix_fadvise"):
        pytest.skip("no madvise(MADV_HUGEPAGE) or posix_fadvise")
    data = np.random.default_rng(0).standard_normal(3_000_000).astype(np.float32)  # 12 MB: 5 whole 2 MiB pieces
    save_file({"w": data}, str(tmp_path / "t.safetensors"))
    _cache_in_small_pages(tmp_path / "t.safetensors")
    f = SafetensorsFile(tmp_path / "t.safetensors")
    w = f.array("w")
    np.testing.assert_array_equal(w, data)  # every page read in
    before = small_page_ranges(f._mm)
    if before is None:
        pytest.skip("the kernel cannot tell a mapping's page sizes (PAGEMAP_SCAN, Linux 6.7+)")
    small = sum(b - a for a, b in before)
    assert small > 0
    assert f.remap_small_pages()[0] == small
    np.testing.assert_array_equal(w, data)
    after = sum(b - a for a, b in small_page_ranges(f._mm))
    if _large_folio_filesystem(tmp_path):
        assert after < HUGE_PAGE  # the partial piece at the end of the file stays small
    assert after <= small


def test_small_pages_probe_stops_where_they_stay_small(tmp_path, monkeypatch):
    """Where the first 2 MiB piece read again comes back in 4 KiB pages (a filesystem without large
    folios), the other pieces are left as they are: no machine reads its weights again at every load."""
    import os

    from safetensors.numpy import save_file

    from qwen2rt import safetensors_io
    from qwen2rt.safetensors_io import HUGE_PAGE, SafetensorsFile

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise")
    save_file({"w": np.ones(3_000_000, np.float32)}, str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(tmp_path / "t.safetensors")
    monkeypatch.setattr(safetensors_io, "_address", lambda mm: 64 * HUGE_PAGE)  # as if 2 MiB aligned
    monkeypatch.setattr(safetensors_io, "small_page_ranges", lambda mm, begin=0, end=None: [(begin, end or len(mm))])
    dropped = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, n, advice: dropped.append((at, n)))
    assert f.remap_small_pages() == (len(f._mm), len(f._mm))
    assert dropped == [(0, HUGE_PAGE)]
    np.testing.assert_array_equal(f.array("w"), 1)
    # a path that names another file by now (converted again) is left alone: the mapping reads the old one
    save_file({"w": np.zeros(3_000_000, np.float32)}, str(tmp_path / "new.safetensors"))
    os.replace(tmp_path / "new.safetensors", tmp_path / "t.safetensors")
    dropped.clear()
    assert f.remap_small_pages() == (len(f._mm), len(f._mm))
    assert dropped == []
    np.testing.assert_array_equal(f.array("w"), 1)


def _rss_file_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))
    except (OSError, StopIteration):
        return None


def test_evicted_pages_leave_rss_and_read_back_the_same(tmp_path):
    # Model evicts an untied embedding's mapped pages after the load check (test_converted_equals_on_the_fly
    # covers the logits of such a model, q32 being untied); here: pages leave RSS, the data stays.
    from safetensors.numpy import save_file

    from qwen2rt.safetensors_io import SafetensorsFile

    a = np.arange(2_000_000, dtype=np.float32)  # 8 MB
    save_file({"a": a}, str(tmp_path / "t.safetensors"))
    f = SafetensorsFile(tmp_path / "t.safetensors")
    view = f.array("a")
    assert view.sum(dtype=np.float64) == a.sum(dtype=np.float64)  # every page read
    before = _rss_file_kb()
    f.evict("a")
    after = _rss_file_kb()
    if before is not None and hasattr(f._mm, "madvise"):
        assert before - after > 6000, (before, after)
    np.testing.assert_array_equal(view, a)
    assert isinstance(qwen2rt._core.release_free_memory(), bool)


def test_converted_dtype_cannot_change(converted):
    _, dst = converted
    with pytest.raises(InvalidInputError, match="q4"):
        qwen2rt.Model(dst, dtype="q8")



@pytest.fixture
def broken(converted, tmp_path):
    import shutil

    _, dst = converted
    out = tmp_path / "broken"
    shutil.copytree(dst, out)
    return out


def test_newer_format_version_refused(broken):
    edit_safetensors_header(broken / "model.safetensors",
                            lambda h: h["__metadata__"].update(qwen2rt_format_version="99"))
    with pytest.raises(UnsupportedModelError, match="version 99"):
        qwen2rt.Model(broken)


def test_wrong_size_refused(broken):
    def shrink(h):
        dtypes = json.loads(h["__metadata__"]["qwen2rt_tensor_dtypes"])
        name = next(k for k, v in dtypes.items() if v == "q4")
        shapes = json.loads(h["__metadata__"]["qwen2rt_shapes"])
        shapes[name][1] += 32  # now the bytes are too few for the shape
        h["__metadata__"]["qwen2rt_shapes"] = json.dumps(shapes)

    edit_safetensors_header(broken / "model.safetensors", shrink)
    with pytest.raises(FormatError, match="shape"):
        qwen2rt.Model(broken)


def test_missing_tensor_refused(broken):
    def drop(h):
        name = "model.layers.0.mlp.gate_proj.weight"
        # keep the file valid: the bytes stay, under a name the metadata does not know
        dtypes = json.loads(h["__metadata__"]["qwen2rt_tensor_dtypes"])
        shapes = json.loads(h["__metadata__"]["qwen2rt_shapes"])
        h["model.layers.0.mlp.gate_proj.unused"] = h.pop(name)
        dtypes["model.layers.0.mlp.gate_proj.unused"] = dtypes.pop(name)
        shapes["model.layers.0.mlp.gate_proj.unused"] = shapes.pop(name)
        h["__metadata__"]["qwen2rt_tensor_dtypes"] = json.dumps(dtypes)
        h["__metadata__"]["qwen2rt_shapes"] = json.dumps(shapes)

    edit_safetensors_header(broken / "model.safetensors", drop)
    with pytest.raises(FormatError, match="gate_proj"):
        qwen2rt.Model(broken)


def test_truncated_converted_file_refused(broken):
    p = broken / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(FormatError):
        qwen2rt.Model(broken)


def test_convert_cli_and_gguf_source(tmp_path):
    import subprocess
    import sys

    from tiny_model import make_checkpoint, write_gguf

    src = tmp_path / "src"
    ref = make_checkpoint(src, shape="q32", seed=12)
    gguf = tmp_path / "m.gguf"
    write_gguf(gguf, ref, src, "Q8_0")
    dst = tmp_path / "m-q8"
    r = subprocess.run([sys.executable, "-m", "qwen2rt", "convert", str(gguf), str(dst), "--dtype", "q8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ids = list(range(5, 30))
    a = qwen2rt.Model(gguf, dtype="q8").forward(ids, all_logits=True)
    b = qwen2rt.Model(dst).forward(ids, all_logits=True)
    np.testing.assert_array_equal(a, b)
    assert qwen2rt.Model(dst).tokenize("hello 世界") == qwen2rt.Model(gguf).tokenize("hello 世界")
    # the untied embedding is kept as the GGUF's Q8_0 blocks, which needs format version 2
    p = dst / "model.safetensors"
    md = json.loads(p.read_bytes()[8 : 8 + int.from_bytes(p.read_bytes()[:8], "little")])["__metadata__"]
    assert md["qwen2rt_format_version"] == "2"
    assert json.loads(md["qwen2rt_tensor_dtypes"])["model.embed_tokens.weight"] == "gguf:8"

    def grow(h):  # one more row than the bytes hold
        shapes = json.loads(h["__metadata__"]["qwen2rt_shapes"])
        shapes["model.embed_tokens.weight"][0] += 1
        h["__metadata__"]["qwen2rt_shapes"] = json.dumps(shapes)

    edit_safetensors_header(p, grow)
    with pytest.raises(FormatError, match="embed_tokens.*holds .* bytes, its shape .* as gguf:8 needs"):
        qwen2rt.Model(dst)


def _mapped_rss_kb(path):
    """Resident KiB of this process's mappings of a file (None without /proc/self/smaps)."""
    try:
        total, inside = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's first line
                    inside = len(head) >= 6 and head[5] == str(path)
                elif inside and head[0] == "Rss:":
                    total += int(head[1])
        return total
    except OSError:
        return None


def test_untied_embedding_rows_read_from_the_file(tmp_path, monkeypatch):
    # An untied embedding's rows are read with pread, not through the mapping: a row read through it
    # maps the cached pages around it too (fault-around), and a long prompt made most of the table
    # resident. Tokens 64 rows (16 KiB) apart: the same logits, and the mapping stays as it was.
    import os

    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=512)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)  # float32: a 4 MiB table
    write_tiny_tokenizer(tmp_path)
    file = (tmp_path / "model.safetensors").resolve()
    ids = list(range(5, 16384, 64))

    def run():
        m = qwen2rt.Model(tmp_path, dtype="f32", max_context=512)
        before = _mapped_rss_kb(file)
        logits = m.forward(ids, all_logits=True)
        grew = None if before is None else _mapped_rss_kb(file) - before
        del m
        return logits, grew

    got, grew = run()
    monkeypatch.delattr(os, "pread")  # rows read through the mapping, as before
    want, grew_mapped = run()
    np.testing.assert_array_equal(got, want)
    if grew is not None:
        assert grew < 64 and grew_mapped > 1024, (grew, grew_mapped)


def test_embedding_file_checked(converted, tmp_path):
    src, dst = converted
    m = qwen2rt.Model(dst)
    if m.config.tie_word_embeddings:
        pytest.skip("a tied embedding is the lm_head: it is not read from the file")
    import os

    short = tmp_path / "short"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(InvalidInputError, match="ends before the embedding"):
        m._core.read_embedding_from_file(os.open(short, os.O_RDONLY), 0)
    owned = qwen2rt.Model(src, dtype="q4")  # quantized at load: its embedding is its own
    with pytest.raises(InvalidInputError, match="not borrowed"):
        owned._core.read_embedding_from_file(os.open(short, os.O_RDONLY), 0)
    np.testing.assert_array_equal(m.forward([1, 2, 3]), owned.forward([1, 2, 3]))
