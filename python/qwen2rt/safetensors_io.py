"""A safetensors reader that maps the file and checks every size and offset before use.

Tensors come back as numpy views of the mapped file (no copy); bf16 tensors are uint16 arrays of
their bit patterns, since numpy has no bfloat16.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
from dataclasses import dataclass

import numpy as np

from .config import short_repr
from .errors import FormatError, ModelNotFoundError

MAX_HEADER_BYTES = 100 << 20

# safetensors dtype -> (numpy dtype of the view, qwen2rt dtype name or None if not a weight dtype)
DTYPES: dict[str, tuple[np.dtype, str | None]] = {
    "F32": (np.dtype("<f4"), "f32"),
    "BF16": (np.dtype("<u2"), "bf16"),
    "F16": (np.dtype("<f2"), "f16"),
    "F64": (np.dtype("<f8"), None),
    "I64": (np.dtype("<i8"), None),
    "U64": (np.dtype("<u8"), None),
    "I32": (np.dtype("<i4"), None),
    "U32": (np.dtype("<u4"), None),
    "I16": (np.dtype("<i2"), None),
    "U16": (np.dtype("<u2"), None),
    "I8": (np.dtype("i1"), None),
    "U8": (np.dtype("u1"), None),
    "BOOL": (np.dtype("u1"), None),
    "F8_E4M3": (np.dtype("u1"), None),
    "F8_E5M2": (np.dtype("u1"), None),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # byte offsets in the data section
    end: int


class SafetensorsFile:
    """One .safetensors file, mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            raise ModelNotFoundError(f"{self.path}: not found") from e
        if not os.path.isfile(self.path):
            raise FormatError(f"{self.path}: not a file")
        if size < 8:
            raise FormatError(f"{self.path}: {size} bytes is too short for a safetensors file")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise FormatError(f"{self.path}: header length {n} runs past the end of the {size}-byte file")
            if n > MAX_HEADER_BYTES:
                raise FormatError(f"{self.path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise FormatError(f"{self.path}: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header is not a JSON object")

        self.data_start = 8 + n
        data_size = size - self.data_start
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{self.path}: __metadata__ is not an object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}

        self.tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            self.tensors[name] = self._check_entry(name, info)
        # Tensors must tile the data section exactly: no overlap, no hole, nothing past the end.
        pos = 0
        for t in sorted(self.tensors.values(), key=lambda t: (t.begin, t.end)):
            if t.begin != pos:
                what = "overlaps the previous tensor" if t.begin < pos else "leaves a gap before it"
                raise FormatError(f"{self.path}: tensor {t.name!r} at offset {t.begin} {what} (expected {pos})")
            pos = t.end
        if pos != data_size:
            raise FormatError(
                f"{self.path}: tensors cover {pos} bytes but the data section holds {data_size}"
                + (" (file truncated?)" if pos > data_size else "")
            )
        self._mm: mmap.mmap | None = None
        self._file_id: tuple[int, int] | None = None  # (device, inode) of the mapped file
        if data_size > 0:
            with open(self.path, "rb") as f:
                self._mm = map_weights(f)
                st = os.fstat(f.fileno())
                self._file_id = (st.st_dev, st.st_ino)

    def _check_entry(self, name: str, info: object) -> TensorInfo:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise FormatError(f"{where}: entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{where}: unknown dtype {short_repr(dtype)}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise FormatError(f"{where}: shape {short_repr(shape)} is not a list of non-negative integers")
        if len(shape) > 8:
            raise FormatError(f"{where}: {len(shape)} dimensions")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise FormatError(
                f"{where}: data_offsets {short_repr(offsets)} are not [begin, end] with 0 <= begin <= end"
            )
        nbytes = math.prod(shape) * DTYPES[dtype][0].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise FormatError(
                f"{where}: shape {shape} x {dtype} is {nbytes} bytes but data_offsets span {offsets[1] - offsets[0]}"
            )
        return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])

    def names(self) -> list[str]:
        return list(self.tensors)

    def evict(self, name: str) -> None:
        """Drop the mapped pages of a tensor from this process's resident memory (see evict_pages)."""
        t = self.tensors[name]
        if self._mm is not None:
            evict_pages(self._mm, self.data_start + t.begin, self.data_start + t.end)

    def file_range(self, name: str) -> tuple[str, int]:
        """The file that holds a tensor, and the offset of its first byte there."""
        return self.path, self.data_start + self.tensors[name].begin

    def remap_small_pages(self) -> tuple[int, int] | None:
        """Its resident pages held in 4 KiB pieces read again as 2 MiB ones (see remap_small_pages)."""
        return remap_small_pages(self._mm, self.path, self._file_id) if self._mm is not None else None

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (bf16 as uint16 bits)."""
        t = self.tensors[name]
        np_dtype = DTYPES[t.dtype][0]
        count = math.prod(t.shape)
        if count == 0 or self._mm is None:
            return np.zeros(t.shape, dtype=np_dtype)
        a = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=self.data_start + t.begin).reshape(t.shape)
        if not a.flags.aligned:
            a = a.copy()  # C++ reads typed elements: give it naturally aligned memory
        return a


def map_weights(f) -> mmap.mmap:
    """A read-only mapping of a weights file, asking for 2 MiB pages before anything is read.

    A decode step reads every weight once; in 4 KiB pages it misses the TLB every 4 KiB, and the
    hardware prefetcher stops at every page. Where the filesystem caches files in large folios (ext4
    and xfs on Linux 6.16+), pages read after this advice come in 2 MiB folios that map as huge pages
    (a converted q4 0.5B model: 328 of its 331 resident MB). On a Zen 4 it then decoded 6-16% faster
    than with 188 MB of it in huge pages. Pages already cached in small folios (by a reader that did not
    ask) stay small: Model() reads those again once loaded (remap_small_pages). `qwen2rt convert`
    writes in whole 2 MiB pieces, which the page cache keeps as 2 MiB folios."""
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # advice only: a kernel without transparent huge pages refuses it
            pass
    return mm


def evict_pages(mm: mmap.mmap, begin: int, end: int) -> None:
    """Drop the whole pages of a read-only file mapping that lie in [begin, end) from this process's
    resident memory: they stay in the page cache and come back, one page at a time, if read again. For
    tensors copied or converted at load, and tables only gathered from (an untied embedding)."""
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    first, last = -(-begin // page) * page, end // page * page  # pages of other tensors are kept
    if last > first:
        # A row read again (an untied embedding's) then maps 4 KiB, not the 2 MiB around it.
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            try:
                mm.madvise(mmap.MADV_NOHUGEPAGE, first, last - first)
            except OSError:
                pass
        mm.madvise(mmap.MADV_DONTNEED, first, last - first)


# --- pages of a mapping: 2 MiB or 4 KiB -----------------------------------------------------------

HUGE_PAGE = 2 << 20


class _PmScanArg(ctypes.Structure):  # struct pm_scan_arg, linux/fs.h
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in "size flags start end walk_end vec vec_len max_pages category_inverted category_mask "
        "category_anyof_mask return_mask".split()
    ]


class _PageRegion(ctypes.Structure):  # struct page_region
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(_PmScanArg) << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, ...)
_PAGE_IS_PRESENT, _PAGE_IS_HUGE = 1 << 3, 1 << 6


def _address(mm: mmap.mmap) -> int:
    view = np.frombuffer(mm, dtype=np.uint8, count=1)
    try:
        return int(view.ctypes.data)
    finally:
        del view  # an exported buffer would keep the mapping from being closed


def small_page_ranges(mm: mmap.mmap, begin: int = 0, end: int | None = None) -> list[tuple[int, int]] | None:
    """Offsets [a, b) in `mm` of the resident pages of [begin, end) that this process maps 4 KiB at
    a time rather than as 2 MiB pages; None where the kernel cannot tell (PAGEMAP_SCAN, Linux 6.7+,
    is missing or refused). Unprivileged: it reads page table flags, not physical addresses."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None

    end = len(mm) if end is None else end
    base = _address(mm)
    out: list[tuple[int, int]] = []
    vec = (_PageRegion * 256)()
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        start = base + begin
        while start < base + end:
            arg = _PmScanArg(
                size=ctypes.sizeof(_PmScanArg), start=start, end=base + end, vec=ctypes.addressof(vec),
                vec_len=len(vec), category_inverted=_PAGE_IS_HUGE,
                category_mask=_PAGE_IS_PRESENT | _PAGE_IS_HUGE, return_mask=_PAGE_IS_PRESENT | _PAGE_IS_HUGE,
            )  # fmt: skip
            try:
                n = fcntl.ioctl(fd, _PAGEMAP_SCAN, arg)
            except OSError:
                return None
            out += [(vec[i].start - base, vec[i].end - base) for i in range(n)]
            if n < len(vec) or arg.walk_end >= base + end:
                break
            start = arg.walk_end
    finally:
        os.close(fd)
    return out


def remap_small_pages(mm: mmap.mmap, path: str, file_id: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """Reads again, as 2 MiB pages, the resident pages of a weights mapping (map_weights) that the
    page cache holds in 4 KiB folios. Returns the bytes of it in 4 KiB pages before and after, or
    None where the kernel cannot tell. file_id: (device, inode) of the file mapped, if `path` may
    since name another one (nothing is done then).

    A file read before without the huge-page advice (copied, hashed, written in small pieces) stays
    cached in 4 KiB folios, and every process that maps it then reads those weights 4 KiB at a time:
    a TLB miss, and the hardware prefetcher stopped, every 4 KiB. On the Zen 4 here, 12 MB of the
    first half of a converted q4 0.5B's lm_head in such pages made the thread reading that half 0.5-0.8
    ms a token slower than the other, which waited for it (5-7% of a decode step). Such 2 MiB pieces
    are dropped from this mapping and from the page cache (clean pages: the file is unchanged) and read
    again through the mapping, which the kernel then fills with 2 MiB folios; from then on every
    process maps them as huge pages. The first piece is a probe: where it comes back small again (a
    filesystem without large folios, or pages another process keeps mapped) nothing more is tried,
    so that such a machine does not read the file again at every load."""
    ranges = small_page_ranges(mm)
    if ranges is None or not hasattr(os, "posix_fadvise"):
        return None
    before = sum(b - a for a, b in ranges)
    if _address(mm) % HUGE_PAGE:
        return before, before  # a mapping that does not start on a 2 MiB boundary has no huge pages
    # whole 2 MiB pieces (a piece past the end of the file is never a huge page)
    pieces = sorted({p for a, b in ranges for p in range(a // HUGE_PAGE, -(-b // HUGE_PAGE))})
    pieces = [p for p in pieces if (p + 1) * HUGE_PAGE <= len(mm)]
    if not pieces:
        return before, before
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # the file is gone or renamed since it was mapped: the mapping still reads it
        return before, before
    st = os.fstat(fd)
    if file_id is not None and (st.st_dev, st.st_ino) != file_id:
        os.close(fd)
        return before, before
    try:
        for i, p in enumerate(pieces):
            o0 = p * HUGE_PAGE
            try:
                mm.madvise(mmap.MADV_DONTNEED, o0, HUGE_PAGE)
                os.posix_fadvise(fd, o0, HUGE_PAGE, os.POSIX_FADV_DONTNEED)
            except OSError:  # advice only
                break
            _ = int(np.frombuffer(mm, dtype=np.uint8, count=HUGE_PAGE, offset=o0)[::4096].max())  # read in again
            if i == 0 and small_page_ranges(mm, o0, o0 + HUGE_PAGE):
                break  # the probe came back small: this filesystem or another process keeps them so
    finally:
        os.close(fd)
    after = small_page_ranges(mm)
    return before, (before if after is None else sum(b - a for a, b in after))
