"""A GGUF reader that maps the file and checks every count, length and offset before use.

GGUF layout (v2 and v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; the metadata key/values; the tensor table (name, dims, type, offset); padding to
`general.alignment` (default 32); the tensor data. The block formats are dequantized by qwen2rt's
C++ code (bit-exact with the `gguf` package's numpy code, which remains the fallback).
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import short_repr
from .errors import FormatError, ModelNotFoundError, UnsupportedModelError
from .safetensors_io import evict_pages, map_weights

MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_KEY_BYTES = 1 << 16
MAX_TENSORS = 1 << 20

# metadata value types: id -> (name, struct format or None for string/array)
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}
_STRING, _ARRAY = 8, 9

# ggml tensor types: id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
# Types whose weights qwen2rt can load (block formats are dequantized to float32).
DEQUANTIZABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
# Block formats dequantized by qwen2rt's C++ (csrc/gguf_dequant.cpp); any other goes to the gguf package.
_CORE_DEQUANT = {2, 3, 6, 7, 8, 10, 11, 12, 13, 14}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str
    type_id: int
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (the contiguous dimension)
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """Row-major shape: [rows, cols] for a matrix (ggml's dimensions reversed)."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Reads little-endian values from the mapped file, refusing to read past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: str):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise FormatError(
                f"{self.path}: {what} at offset {self.pos} runs past the end of the file ({self.size} bytes)"
            )

    def scalar(self, fmt: str, size: int, what: str):
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise FormatError(f"{self.path}: {what} is {n} bytes long (limit {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None


class GGUFFile:
    """One GGUF file, mapped read-only: metadata as Python values, tensors as checked byte ranges."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            f = open(self.path, "rb")
        except OSError as e:
            raise ModelNotFoundError(f"{self.path}: cannot open ({e.strerror or e})") from None
        with f:
            if size < 24:
                raise FormatError(f"{self.path}: {size} bytes is too short for a GGUF file")
            self._mm = map_weights(f)
        c = _Cursor(self._mm, self.path)
        if bytes(self._mm[:4]) != MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (magic {bytes(self._mm[:4])!r})")
        c.pos = 4
        self.version = c.u32("version")
        if self.version not in (2, 3):
            raise UnsupportedModelError(f"{self.path}: GGUF version {self.version} (qwen2rt reads versions 2 and 3)")
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata count")
        # Every metadata entry takes at least 8 + 1 + 4 + 1 bytes and every tensor entry at least
        # 8 + 4 + 8 + 4 + 8 (an empty name): counts beyond what the file could hold are refused before any loop.
        if n_kv > size // 14:
            raise FormatError(f"{self.path}: metadata count {n_kv} cannot fit in a {size}-byte file")
        if n_tensors > min(MAX_TENSORS, size // 32):
            raise FormatError(f"{self.path}: tensor count {n_tensors} cannot fit in a {size}-byte file")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}", MAX_KEY_BYTES)
            vtype = c.u32(f"type of {key!r}")
            if key in self.metadata:
                raise FormatError(f"{self.path}: metadata key {key!r} appears twice")
            self.metadata[key] = self._value(c, vtype, key)

        align = self.metadata.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align > 1 << 16 or align & (align - 1):
            raise FormatError(f"{self.path}: general.alignment {short_repr(align)} is not a power of two in 1..65536")
        self.alignment = align

        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor name #{i}", MAX_KEY_BYTES)
            n_dims = c.u32(f"dimension count of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise FormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            c.need(8 * n_dims, f"dimensions of tensor {name!r}")
            dims = struct.unpack_from(f"<{n_dims}Q", self._mm, c.pos)
            c.pos += 8 * n_dims
            type_id = c.u32(f"type of tensor {name!r}")
            offset = c.u64(f"offset of tensor {name!r}")
            infos.append((name, dims, type_id, offset))

        self.data_start = -(-c.pos // align) * align
        data_size = size - self.data_start
        if data_size < 0:
            raise FormatError(f"{self.path}: the file ends inside the tensor table padding")
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            where = f"{self.path}: tensor {name!r}"
            if name in self.tensors:
                raise FormatError(f"{where} appears twice")
            if type_id not in GGML_TYPES:
                raise UnsupportedModelError(f"{where} has unknown ggml type {type_id}")
            type_name, block, type_size = GGML_TYPES[type_id]
            if any(d < 1 or d > 1 << 40 for d in dims):
                raise FormatError(f"{where} has dimensions {list(dims)} out of range")
            count = math.prod(dims)
            if count > 1 << 40:
                raise FormatError(f"{where}: {list(dims)} is {count} elements, too many")
            if dims[0] % block:
                raise FormatError(
                    f"{where}: row length {dims[0]} is not a multiple of the {type_name} block size {block}"
                )
            nbytes = count // block * type_size
            if offset % align:
                raise FormatError(f"{where}: offset {offset} is not aligned to {align}")
            if offset + nbytes > data_size:
                raise FormatError(
                    f"{where}: bytes {offset}..{offset + nbytes} run past the end of the data section "
                    f"({data_size} bytes; file truncated?)"
                )
            self.tensors[name] = GGUFTensor(name, type_name, type_id, tuple(dims), offset, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise FormatError(f"{self.path}: tensors {n0!r} and {n1!r} overlap")

    def _value(self, c: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return c.scalar(fmt, size, f"value of {key!r}")
        if vtype == _STRING:
            return c.string(f"value of {key!r}")
        if vtype != _ARRAY:
            raise FormatError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")
        if depth > 0:
            raise UnsupportedModelError(f"{self.path}: metadata {key!r} is an array of arrays")
        itype = c.u32(f"item type of {key!r}")
        n = c.u64(f"length of {key!r}")
        if itype in _SCALARS:
            size = _SCALARS[itype][1]
            c.need(n * size, f"array {key!r} ({n} items)")
            a = np.frombuffer(self._mm, dtype=_NUMPY[itype], count=n, offset=c.pos)
            c.pos += n * size
            return (a.astype(bool) if itype == 7 else a).tolist()
        if itype == _STRING:
            c.need(n * 8, f"array {key!r} ({n} strings)")  # each string has at least its length
            return self._strings(c, n, key)
        if itype == _ARRAY:
            raise UnsupportedModelError(f"{self.path}: metadata {key!r} is an array of arrays")
        raise FormatError(f"{self.path}: array {key!r} has unknown item type {itype}")

    def _strings(self, c: _Cursor, n: int, key: str) -> list[str]:
        """n strings in a row (a vocabulary: 150k of them), in a tight loop."""
        buf, pos, size = self._mm, c.pos, c.size
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        try:
            for _ in range(n):
                length = unpack(buf, pos)[0]
                pos += 8
                end = pos + length
                if end > size:
                    raise FormatError(f"{self.path}: a string of {key!r} runs past the end of the file")
                append(buf[pos:end].decode("utf-8"))
                pos = end
        except struct.error:
            raise FormatError(f"{self.path}: array {key!r} runs past the end of the file") from None
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.path}: item {len(out)} of {key!r} is not valid UTF-8 ({e})") from None
        c.pos = pos
        return out

    # -- tensor data ----------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=self.data_start + t.offset)

    def file_range(self, name: str) -> tuple[str, int]:
        """The file that holds a tensor, and the offset of its first byte there."""
        return self.path, self.data_start + self.tensors[name].offset

    def evict(self, name: str) -> None:
        """Drop a tensor's mapped pages from resident memory (safetensors_io.evict_pages)."""
        t = self.tensors[name]
        evict_pages(self._mm, self.data_start + t.offset, self.data_start + t.offset + t.nbytes)

    def array(self, name: str, threads: int = 1, raw_blocks: bool = False) -> tuple[np.ndarray, str]:
        """(array, qwen2rt dtype) in row-major shape: F32, F16 and BF16 as views of the file
        (BF16 as uint16 bits), block formats dequantized to float32 (in C++, on `threads` threads) or,
        with raw_blocks, as their bytes with the dtype "gguf:<ggml type>" (Qwen2Model.set_tensor's)."""
        t = self.tensors[name]
        raw = self.raw(name)
        if raw_blocks and t.type_id in _CORE_DEQUANT:
            return raw, f"gguf:{t.type_id}"
        if t.type_name == "F32":
            return raw.view("<f4").reshape(t.numpy_shape), "f32"
        if t.type_name == "F16":
            return raw.view("<f2").reshape(t.numpy_shape), "f16"
        if t.type_name == "BF16":
            return raw.view("<u2").reshape(t.numpy_shape), "bf16"
        if t.type_name not in DEQUANTIZABLE:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name!r} has type {t.type_name}; qwen2rt loads "
                f"{', '.join(sorted(DEQUANTIZABLE))}"
            )
        if t.type_id in _CORE_DEQUANT:
            from . import _core

            return _core.dequantize_gguf(t.type_id, raw, math.prod(t.shape), threads).reshape(t.numpy_shape), "f32"
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        rows = raw.reshape(t.numpy_shape[:-1] + (-1,))
        out = dequantize(rows, GGMLQuantizationType(t.type_id))
        return np.ascontiguousarray(out, dtype=np.float32).reshape(t.numpy_shape), "f32"
