"""Converted models: weights already quantized and laid out for the kernels, loaded by mmap.

`qwen2rt convert SRC DST --dtype q4` writes a folder:

    DST/model.safetensors         packed matrices as U8 tensors (quant.h layouts), norms/biases as F32;
                                  an untied embedding from a GGUF file as its GGUF blocks (U8, "gguf:N")
    DST/config.json               the Qwen2 config (Hugging Face keys)
    DST/generation_config.json    eos ids and sampling defaults
    DST/tokenizer.json, tokenizer_config.json

The safetensors metadata names the format and version, the dtype, and each tensor's dtype and
logical shape, so that loading does no conversion: Model(DST) points the C++ matrices into the
mapped file. A file with a newer format version, a wrong size or a missing tensor is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Iterator

import numpy as np

from .config import short_repr
from .errors import FormatError, InvalidInputError, UnsupportedModelError

FORMAT_NAME = "qwen2rt"
# 2: an untied embedding may be GGUF blocks (dtype "gguf:<ggml type>"). 3: bf16 matrices are packed
# as they were held then (dtype "bf16p": groups of 8 rows by blocks of 32 columns). 4: as they are
# held now (dtype "bf16p32": groups of 32 rows by column pairs, csrc/quant.h), mapped with no copy.
# 5: q6 matrices (a q4 model's lm_head). Version 1 and 2 files hold bf16 row-major ("bf16") and
# version 3 files in the old groups; both load by packing a copy. A file is written with the lowest
# version that reads it, so that a qwen2rt reading version 1 still reads the others.
FORMAT_VERSION = 5
ALIGN = 64  # the data section starts on a 64-byte boundary


MATRIX_DTYPES = ("bf16", "f32", "q8", "q6", "q4")  # model.WEIGHT_DTYPES
TENSOR_DTYPES = MATRIX_DTYPES + ("bf16p", "bf16p32")  # what a tensor may be stored as (but a GGUF embedding)
GGUF_EMBEDDING = "model.embed_tokens.weight"  # the one tensor that may be GGUF blocks
Q_VALUE_BYTES = {"q8": 512, "q6": 384, "q4": 256}  # a packed block's values, after its 32 bytes of scales


def gguf_block_type(dtype: str) -> int | None:
    """N of a "gguf:N" dtype whose blocks the C++ core reads (gguf_io's core formats), else None."""
    from .gguf_io import _CORE_DEQUANT

    if not isinstance(dtype, str) or not dtype.startswith("gguf:") or not dtype[5:].isdigit():
        return None
    n = int(dtype[5:])
    return n if n in _CORE_DEQUANT else None


def packed_bytes(dtype: str, shape: list[int]) -> int:
    """Bytes of a tensor in the C++ layout (csrc/quant.h): q8/q6/q4 matrices in groups of 16 rows by
    blocks of 32 columns, 32 bytes of f16 scales then 512 (q8), 384 (q6) or 256 (q4) bytes of values a block;
    GGUF blocks row by row (each row whole blocks, else -1: no size fits)."""
    if (ggml := gguf_block_type(dtype)) is not None:
        from .gguf_io import GGML_TYPES

        _, block, nbytes = GGML_TYPES[ggml]
        rows, cols = shape
        return rows * (cols // block) * nbytes if cols % block == 0 else -1
    if dtype in Q_VALUE_BYTES:
        rows, cols = shape
        return -(-rows // 16) * -(-cols // 32) * (32 + Q_VALUE_BYTES[dtype])
    if dtype in ("bf16p", "bf16p32"):  # groups of 8 (32) rows by 32 (32) columns, zero-padded
        rows, cols = shape
        group = 8 if dtype == "bf16p" else 32
        return -(-rows // group) * -(-cols // 32) * 64 * group
    count = shape[0] * (shape[1] if len(shape) == 2 else 1)
    return count * (2 if dtype == "bf16" else 4)


def _lowest_version(dtype: str, kinds: set[str]) -> int:
    """The lowest format version that reads a file of these tensor dtypes (FORMAT_VERSION's list)."""
    if dtype == "q6" or "q6" in kinds:
        return 5
    if "bf16p32" in kinds:
        return 4
    return 2 if any(k.startswith("gguf:") for k in kinds) else 1


HUGE_PAGE = 2 << 20


def write_in_huge_pages(f, parts: list, progress=None) -> None:
    """Writes `parts` back to back from the start of the unbuffered file `f`, in writes of whole
    2 MiB-aligned pieces. A filesystem with large folios (ext4, xfs on Linux 6.16+) caches each
    piece as one 2 MiB folio, which Model() then maps as a huge page (safetensors_io.map_weights).
    Written a tensor at a time, the file just converted had its pieces that straddle two tensors
    cached in small folios: 240 of a q4 0.5B model's 441 MB mapped in 2 MiB pages, not 430."""
    buf, fill = bytearray(HUGE_PAGE), 0

    def write(data) -> None:
        view = memoryview(data)
        while view:
            n = f.write(view)
            view = view[n:]

    for i, part in enumerate(parts):
        view = memoryview(part).cast("B")
        while view:
            n = min(len(view), HUGE_PAGE - fill)
            buf[fill:fill + n] = view[:n]
            fill, view = fill + n, view[n:]
            if fill == HUGE_PAGE:
                write(buf)
                fill = 0
        if progress is not None and i >= 2:  # the blobs, not the header
            progress(i - 1)
    write(memoryview(buf)[:fill])


def is_converted(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT_NAME


class ConvertedWeights:
    """The tensors of a converted safetensors file, checked against its own metadata."""

    def __init__(self, st_file):
        md = st_file.metadata
        path = st_file.path
        try:
            version = int(md.get("qwen2rt_format_version", ""))
        except ValueError:
            raise FormatError(
                f"{path}: qwen2rt_format_version {short_repr(md.get('qwen2rt_format_version'))} is not a number"
            ) from None
        if version > FORMAT_VERSION:
            raise UnsupportedModelError(
                f"{path}: qwen2rt format version {version} is newer than this qwen2rt reads ({FORMAT_VERSION}); "
                f"upgrade qwen2rt or convert the model again"
            )
        if version < 1:
            raise FormatError(f"{path}: qwen2rt format version {version} is not valid")
        try:
            self.dtypes: dict[str, str] = json.loads(md["qwen2rt_tensor_dtypes"])
            self.shapes: dict[str, list[int]] = json.loads(md["qwen2rt_shapes"])
        except KeyError as e:
            raise FormatError(f"{path}: qwen2rt metadata is incomplete (no {e})") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"{path}: qwen2rt metadata is not valid JSON ({e})") from None
        if not isinstance(self.dtypes, dict) or not isinstance(self.shapes, dict):
            raise FormatError(f"{path}: qwen2rt_tensor_dtypes and qwen2rt_shapes must be JSON objects")
        self.dtype = md.get("qwen2rt_dtype", "")
        if self.dtype not in MATRIX_DTYPES:
            raise FormatError(f"{path}: qwen2rt_dtype {self.dtype!r} is not one of {', '.join(MATRIX_DTYPES)}")
        self.file = st_file
        for name, info in st_file.tensors.items():
            if name not in self.dtypes or name not in self.shapes:
                raise FormatError(f"{path}: tensor {name!r} has no dtype or shape in the qwen2rt metadata")
            dtype, shape = self.dtypes[name], self.shapes[name]
            if dtype not in TENSOR_DTYPES and not (name == GGUF_EMBEDDING and gguf_block_type(dtype) is not None):
                raise FormatError(f"{path}: tensor {name!r} has qwen2rt dtype {short_repr(dtype)}")
            if (
                not isinstance(shape, list)
                or not 1 <= len(shape) <= 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n < 2**31 for n in shape)
                or (dtype != "f32" and len(shape) != 2)
            ):
                raise FormatError(f"{path}: tensor {name!r} has qwen2rt shape {short_repr(shape)}")
            need = packed_bytes(dtype, shape)
            if info.end - info.begin != need:
                raise FormatError(
                    f"{path}: tensor {name!r} holds {info.end - info.begin} bytes, its shape {shape} "
                    f"as {dtype} needs {need}"
                )

    def tensors(self) -> Iterator[tuple[str, np.ndarray, str, list[int]]]:
        for name, info in self.file.tensors.items():
            dtype = self.dtypes[name]
            expect = "F32" if dtype == "f32" else "U8"
            if info.dtype != expect:
                raise FormatError(
                    f"{self.file.path}: tensor {name!r} is {info.dtype}, its qwen2rt dtype {dtype} needs {expect}"
                )
            array = self.file.array(name)
            if dtype in ("bf16", "bf16p", "bf16p32"):
                array = array.view(np.uint16)
            if dtype == "bf16p":  # version 3's groups of 8 rows: back to row-major, packed again at load
                array, dtype = unpack_bf16_groups8(array, *self.shapes[name]), "bf16"
            elif dtype == "bf16p32":  # the layout the core holds (its name for it)
                dtype = "bf16p"
            yield name, array, dtype, self.shapes[name]


def unpack_bf16_groups8(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A version-3 "bf16p" matrix (groups of 8 rows, blocks of 32 columns: [row // 8][col // 32]
    [row % 8][col % 32]) as a row-major [rows, cols] array of bf16 bits."""
    g, b = -(-rows // 8), -(-cols // 32)
    return np.ascontiguousarray(packed.reshape(g, b, 8, 32).transpose(0, 2, 1, 3).reshape(g * 8, b * 32)[:rows, :cols])


class _Progress:
    """A one-line bar on a terminal; a single summary line otherwise."""

    def __init__(self, what: str, total: int, enabled: bool):
        self.what, self.total, self.t0 = what, total, time.perf_counter()
        self.enabled, self.tty, self.shown = enabled, enabled and sys.stderr.isatty(), -1

    def update(self, done: int) -> None:
        width = 30
        fill = int(width * done / max(self.total, 1))
        if self.tty and (fill != self.shown or done == self.total):
            self.shown = fill
            sys.stderr.write(f"\r{self.what} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                             f"{time.perf_counter() - self.t0:5.1f} s")
        if done == self.total and self.enabled:
            summary = f"{self.what}: {self.total} tensors, {time.perf_counter() - self.t0:.1f} s\n"
            sys.stderr.write("\n" if self.tty else summary)
        sys.stderr.flush()


def convert(
    src: str,
    dst: str,
    dtype: str = "q4",
    threads: int | None = None,
    progress: bool = True,
    dtype_overrides: dict[str, str] | None = None,
) -> str:
    """Quantizes SRC (a Hugging Face folder, a GGUF file or a registry name) into the folder DST."""
    from . import _core, registry
    from .checkpoint import open_checkpoint
    from .model import WEIGHT_DTYPES, default_threads, matrix_dtype_policy

    if dtype not in WEIGHT_DTYPES:
        raise InvalidInputError(f"dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    registry_defaults: dict[str, Any] = {}
    if not os.path.exists(src):
        path = registry.resolve(src)
        registry_defaults = registry.lookup(src).generation_config
        src = path
    ckpt = open_checkpoint(src)
    if getattr(ckpt, "converted", None) is not None:
        raise InvalidInputError(f"{src} is already a converted qwen2rt model; convert from the original weights")
    threads = threads or default_threads()
    cfg = ckpt.config
    core = _core.Qwen2Model(cfg.core_dict(), dtype, threads, 1, "f32")
    policy = matrix_dtype_policy(dtype, dtype_overrides, cfg.tie_word_embeddings)

    names = []
    items = list(ckpt.tensors(threads))
    bar = _Progress(f"quantize to {dtype}", len(items), progress)
    for i, (name, array, src_dtype, shape) in enumerate(items):
        core.set_tensor(name, array, src_dtype, shape, dtype=policy(name))
        names.append(name)
        bar.update(i + 1)
        items[i] = None  # let the source array go
    missing = core.missing_tensors()
    if missing:
        raise FormatError(f"{src}: weights missing: {', '.join(missing[:3])}")

    header: dict[str, Any] = {}
    tensor_dtypes, shapes, blobs = {}, {}, []
    offset = 0
    # packed matrices first (sizes are multiples of 32 bytes), then the small f32 vectors, then GGUF
    # blocks (read a row at a time, at any alignment)
    views = []
    for name in names:
        v = core.tensor_bytes(name)
        if v is not None:
            views.append((name,) + tuple(v))
    views.sort(key=lambda v: (v[1].startswith("gguf:"), v[1] == "f32" and v[4] == 0))
    for name, kind, data, rows, cols in views:
        if kind == "bf16" and cols:  # a bf16 matrix is held packed, and stored so
            kind = "bf16p32"
        tensor_dtypes[name] = kind
        shapes[name] = [rows, cols] if cols else [rows]
        st_dtype = "F32" if kind == "f32" else "U8"
        count = data.size // 4 if st_dtype == "F32" else data.size
        header[name] = {"dtype": st_dtype, "shape": [count], "data_offsets": [offset, offset + data.size]}
        blobs.append(data)
        offset += data.size
    header["__metadata__"] = {
        "format": FORMAT_NAME,
        "qwen2rt_format_version": str(_lowest_version(dtype, set(tensor_dtypes.values()))),
        "qwen2rt_dtype": dtype,
        "qwen2rt_tensor_dtypes": json.dumps(tensor_dtypes),
        "qwen2rt_shapes": json.dumps(shapes),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)

    os.makedirs(dst, exist_ok=True)
    tmp = os.path.join(dst, ".model.safetensors.tmp")
    bar = _Progress("write", len(blobs), progress)
    try:
        with open(tmp, "wb", buffering=0) as f:
            write_in_huge_pages(f, [len(raw).to_bytes(8, "little"), raw, *blobs], bar.update)
        os.replace(tmp, os.path.join(dst, "model.safetensors"))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

    config = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", **{
        k: v for k, v in cfg.core_dict().items() if k not in ("eos_token_id", "torch_dtype")
    }}
    config["eos_token_id"] = list(cfg.eos_token_id)
    config["qwen2rt_dtype"] = dtype
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump({**registry_defaults, **ckpt.generation_config}, f, indent=2)
    if os.path.isdir(src):  # keep the original tokenizer files byte for byte
        for fname in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if os.path.exists(os.path.join(src, fname)):
                shutil.copyfile(os.path.join(src, fname), os.path.join(dst, fname))
    else:
        ckpt.load_tokenizer().save_pretrained(dst)
    return dst
