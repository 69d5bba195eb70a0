"""Hashing the files of a bundle: SHA-256 of a path or of bytes already read, a file read once into
private memory with the digest of exactly those bytes, and :class:`FileHashes`, which remembers a
digest while the file provably stays the one that was hashed (an engine re-adding an adapter does
not re-read it)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from edge_lora.errors import EdgeLoraError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 18) -> str:
    with open(path, "rb", buffering=0) as f:
        return _sha256_open(f, chunk)


def _sha256_open(f: BinaryIO, chunk: int = 1 << 18) -> str:
    """SHA-256 of an open unbuffered file, read into one reused buffer (no allocation per block)."""
    digest = hashlib.sha256()
    buf = memoryview(bytearray(chunk))
    while n := f.readinto(buf):
        digest.update(buf[:n])
    return digest.hexdigest()


def _read_whole(f: BinaryIO, size: int) -> bytes:
    """``size`` bytes of ``f`` as immutable bytes: nothing, not even the caller, can change them after
    they are hashed. One read into memory that is not zero-filled first, from the C heap, which
    reuses freed memory. 20 MB on the busy 2-core VM, fresh / reused memory: 7.8 / 1.4 ms, against
    10.5 / 2.2 ms into a bytearray (zero-filled first) and 6.5 / 6.6 ms into an anonymous map
    (faulted in afresh every time); not np.empty, which asks for huge pages above 4 MiB, whose first
    touch cost 40-60 ms per 20 MB about half the time on the benchmark VM."""
    data = f.read(size)
    while len(data) < size and (more := f.read(size - len(data))):
        data += more
    if len(data) < size:
        raise EdgeLoraError(
            "the file ended early (truncated while being read?)", path=f.name, hint="copy the file again"
        )
    return data


def _sha256_buffer(data: bytes | memoryview) -> str:
    """SHA-256 of bytes already in memory (one call: hashlib lets go of the GIL for all of it)."""
    return hashlib.sha256(data).hexdigest()


def _sha256_fd(fd: int) -> str:
    with open(fd, "rb", buffering=0, closefd=False) as f:
        f.seek(0)
        return _sha256_open(f)


def _copy_exactly(f: BinaryIO, out_fd: int, size: int) -> None:
    """``size`` bytes of ``f`` into ``out_fd`` by the kernel (no trip through Python's memory)."""
    done = 0
    try:
        while done < size and (n := os.sendfile(out_fd, f.fileno(), done, size - done)):
            done += n
    except OSError:  # no sendfile into this kind of file here (macOS): copy through a buffer
        f.seek(done)
        buf = memoryview(bytearray(1 << 20))
        while done < size and (n := f.readinto(buf[: min(len(buf), size - done)])):
            os.write(out_fd, buf[:n])
            done += n
    if done < size:
        raise EdgeLoraError(
            "the file ended early (truncated while being read?)", path=f.name, hint="copy the file again"
        )


def _identity(stat: os.stat_result) -> tuple:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class FileHashes:
    """SHA-256 of files, remembered while each file provably stays the one that was hashed.

    A digest is reused only while the file's device, inode, size, mtime and ctime are unchanged:
    every write, truncation, rename over it or ``utime`` moves ctime, which no user can set back.
    File times tick coarsely (milliseconds), so a change in the same tick as the previous one would
    keep them: only a file whose last change is ``SETTLE_NS`` older than the hash is remembered
    (git's "racily clean" rule); a fresher one is hashed every time.
    """

    SETTLE_NS = 2_000_000_000

    def __init__(self):
        self._known: dict[str, tuple[tuple, str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: str | os.PathLike) -> str:
        key = os.fspath(path)
        with self._lock:
            known = self._known.get(key)
        if known is not None and known[0] == _identity(os.stat(key)):
            return known[1]
        started = time.time_ns()
        with open(key, "rb", buffering=0) as f:
            before = _identity(os.fstat(f.fileno()))
            digest = _sha256_open(f)
            after = _identity(os.fstat(f.fileno()))
        self._note(key, before, after, digest, started)
        return digest

    def read(
        self,
        path: str | os.PathLike,
        *,
        digest: bool = True,
        max_bytes: int | None = None,
        background: bool = False,
        into_fd: int | None = None,
    ) -> FileBytes:
        """The whole file, read once, and (``digest=True``) the SHA-256 of exactly the bytes in hand.

        The bytes land in private memory (``FileBytes.data``), or with ``into_fd`` in that file (a
        private in-memory one: a library that only opens paths reads the copy, which nobody else can
        change). ``background=True`` hashes them on a thread while the caller parses them
        (``FileBytes.sha256`` waits): nothing may be used before that digest is checked.
        A remembered digest stands for the bytes only when the file kept the identity it had when it
        was hashed from before this read to after it; otherwise the bytes in hand are hashed."""
        key = os.fspath(path)
        started = time.time_ns()
        with open(key, "rb", buffering=0) as f:
            before = _identity(os.fstat(f.fileno()))
            if max_bytes is not None and before[2] > max_bytes:
                raise EdgeLoraError(
                    f"file is {before[2]} bytes, more than the {max_bytes} it can hold",
                    path=key,
                    hint="the file is corrupt or not the one expected; copy it again",
                )
            with self._lock:
                known = self._known.get(key)
            remembered = known[1] if digest and known is not None and known[0] == before else None
            if into_fd is not None:
                data = None
                _copy_exactly(f, into_fd, before[2])
            else:
                data = _read_whole(f, before[2])
            after = _identity(os.fstat(f.fileno()))
        if not digest:
            return FileBytes(Path(key), data, None)
        # a remembered digest is of these bytes only if the file held still while they were read
        stands = remembered is not None and before == after

        def finish() -> str:
            sha = remembered if stands else _sha256_buffer(data) if data is not None else _sha256_fd(into_fd)
            self._note(key, before, after, sha, started)
            return sha

        if background and not stands:
            return FileBytes(Path(key), data, pending=finish)
        return FileBytes(Path(key), data, finish())

    def _note(self, key: str, before: tuple, after: tuple, digest: str, started: int) -> None:
        settled = started - max(before[3], before[4]) >= self.SETTLE_NS
        with self._lock:
            if before == after and settled:
                self._known[key] = (after, digest)
            else:
                self._known.pop(key, None)


class FileBytes:
    """A file read once: its bytes (private memory the file cannot change; None when they were
    copied into a file) and, when it was asked for, the SHA-256 of exactly these bytes."""

    def __init__(
        self,
        path: Path,
        data: bytes | None,
        sha256: str | None = None,
        *,
        pending: Callable[[], str] | None = None,
    ):
        self.path, self.data, self._sha256, self._error = path, data, sha256, None
        self._thread = None
        if pending is not None:  # hashlib lets go of the GIL: the hash runs beside the caller's parsing
            self._thread = threading.Thread(
                target=self._run, args=(pending,), name="edge-lora-sha256", daemon=True
            )
            self._thread.start()

    def _run(self, pending: Callable[[], str]) -> None:
        try:
            self._sha256 = pending()
        except BaseException as err:  # noqa: BLE001 - handed to whoever asks for the digest
            self._error = err

    @property
    def sha256(self) -> str | None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self._sha256
