"""The bundle: the folder `edge-lora export` writes and the runtime loads, described by bundle.json.

bundle.json (format version 1)::

    {
      "format": "edge-lora-bundle", "format_version": 1, "created_by": "edge-lora 0.1.0",
      "model": {...ModelConfig...}, "base_fingerprint": "sha256:...",
      "tokenizer": {"tokenizer": "tokenizer.json", "config": "tokenizer_config.json"},
      "backends": {
        "onnx": [{"quant": "int4", "variant": "fast", "model": "onnx/int4-fast/model.onnx"}],
        "gguf": [{"quant": "q4_0", "model": "gguf/model-q4_0.gguf"}]
      },
      "adapters": {"sql": {"source": "adapters/sql.safetensors", "scale": 1.0,
                           "onnx": "adapters/sql.onnx_adapter", "gguf": "adapters/sql.gguf"}},
      "files": {"adapters/sql.safetensors": {"sha256": "...", "bytes": 123}, ...}
    }

Every path is relative to the bundle and must stay inside it (no ``..``, no absolute paths, no
symlinks out). A bundle is valid only once bundle.json is in place: writers put it last.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.atomic import atomic_write_text
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError

FORMAT = "edge-lora-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 18) -> str:
    with open(path, "rb", buffering=0) as f:
        return _sha256_open(f, chunk)


def _sha256_open(f, chunk: int = 1 << 18) -> str:
    """SHA-256 of an open unbuffered file, read into one reused buffer (no allocation per block)."""
    digest = hashlib.sha256()
    buf = memoryview(bytearray(chunk))
    while n := f.readinto(buf):
        digest.update(buf[:n])
    return digest.hexdigest()


def _read_whole(f, size: int) -> bytes:
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


def _sha256_buffer(data) -> str:
    """SHA-256 of bytes already in memory (one call: hashlib lets go of the GIL for all of it)."""
    return hashlib.sha256(data).hexdigest()


def _sha256_fd(fd: int) -> str:
    with open(fd, "rb", buffering=0, closefd=False) as f:
        f.seek(0)
        return _sha256_open(f)


def _copy_exactly(f, out_fd: int, size: int) -> None:
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

    def __init__(self, path: Path, data, sha256: str | None = None, *, pending=None):
        self.path, self.data, self._sha256, self._error = path, data, sha256, None
        self._thread = None
        if pending is not None:  # hashlib lets go of the GIL: the hash runs beside the caller's parsing
            self._thread = threading.Thread(
                target=self._run, args=(pending,), name="edge-lora-sha256", daemon=True
            )
            self._thread.start()

    def _run(self, pending) -> None:
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


@dataclass
class Bundle:
    root: Path
    config: ModelConfig
    base_fingerprint: str
    tokenizer: dict
    backends: dict[str, list[dict]] = field(default_factory=dict)
    adapters: dict[str, dict] = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    # verified digests for this bundle's life (an engine's): re-adding an adapter does not re-read it
    hashes: FileHashes = field(default_factory=FileHashes, repr=False, compare=False)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def open(cls, root: str | os.PathLike) -> Bundle:
        root = Path(root)
        manifest = root / MANIFEST
        if not root.is_dir():
            raise EdgeLoraError(
                "not a bundle directory", path=root, hint="pass the folder `edge-lora export --out` wrote"
            )
        if not manifest.is_file():
            raise EdgeLoraError(
                "no bundle.json: not a bundle, or its export did not finish",
                path=root,
                hint="run `edge-lora export` again",
            )
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            raise EdgeLoraError(
                "bundle.json is implausibly large", path=manifest, hint="re-export the bundle"
            )
        try:
            raw = json.loads(manifest.read_text(encoding="utf-8"))
        except (
            UnicodeDecodeError,
            json.JSONDecodeError,
            RecursionError,
        ) as err:  # RecursionError: hostile nesting
            raise EdgeLoraError(
                f"bundle.json is not valid JSON ({err.__class__.__name__})",
                path=manifest,
                hint="re-export the bundle",
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise EdgeLoraError(
                "bundle.json is not an edge-lora bundle manifest",
                path=manifest,
                hint="pass the folder `edge-lora export` wrote",
            )
        version = raw.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise EdgeLoraError(
                f"bundle format version {version!r} is newer than this edge-lora reads ({FORMAT_VERSION})",
                path=manifest,
                hint="upgrade edge-lora",
            )
        for key, kind in (
            ("model", dict),
            ("base_fingerprint", str),
            ("tokenizer", dict),
            ("backends", dict),
            ("adapters", dict),
            ("files", dict),
        ):
            if not isinstance(raw.get(key), kind):
                raise EdgeLoraError(
                    f"bundle.json: key {key!r} is missing or not a {kind.__name__}",
                    path=manifest,
                    hint="re-export the bundle",
                )
        try:
            config = ModelConfig.from_saved(raw["model"])
            config.validate(manifest)
        except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as err:
            raise EdgeLoraError(
                f"bundle.json: bad model config ({err})", path=manifest, hint="re-export the bundle"
            ) from None
        bundle = cls(
            root=root,
            config=config,
            base_fingerprint=raw["base_fingerprint"],
            tokenizer=raw["tokenizer"],
            backends=raw["backends"],
            adapters=raw["adapters"],
            files=raw["files"],
            raw=raw,
        )
        bundle._check_paths()
        return bundle

    def _check_paths(self) -> None:
        refs = [self.tokenizer.get("tokenizer")] + list(self.files)
        for entries in self.backends.values():
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise EdgeLoraError(
                    "bundle.json: each backend lists entries as objects",
                    path=self.manifest_path,
                    hint="re-export the bundle",
                )
            refs += [e.get("model") for e in entries]
        for name, entry in self.adapters.items():
            if not isinstance(entry, dict):
                raise EdgeLoraError(
                    f"bundle.json: adapter {name!r} is not an object",
                    path=self.manifest_path,
                    hint="re-export the bundle",
                )
            refs += [v for k, v in entry.items() if k in ("source", "onnx", "gguf")]
        for ref in refs:
            self.resolve(ref)

    def resolve(self, rel) -> Path:
        """The absolute path of a bundle entry, refusing anything that escapes the bundle."""
        if not isinstance(rel, str) or not rel:
            raise EdgeLoraError(
                f"bundle.json: file entry {rel!r} is not a relative path",
                path=self.manifest_path,
                hint="re-export the bundle",
            )
        candidate = Path(rel)
        if candidate.is_absolute() or ".." in candidate.parts or "\\" in rel:
            raise EdgeLoraError(
                f"bundle.json: file entry {rel!r} points outside the bundle",
                path=self.manifest_path,
                hint="a bundle only references files inside its own folder",
            )
        full = self.root / candidate
        if full.resolve().is_relative_to(self.root.resolve()) is False:
            raise EdgeLoraError(
                f"bundle.json: file entry {rel!r} is a link that leaves the bundle",
                path=self.manifest_path,
                hint="copy the bundle with its files, not links to them",
            )
        return full

    def require(self, rel: str) -> Path:
        full = self.resolve(rel)
        if not full.is_file():
            raise EdgeLoraError(
                f"bundle file {rel!r} is missing or not a file", path=self.root, hint="re-export the bundle"
            )
        return full

    def verify_file(self, rel: str) -> Path:
        """Check a file against the SHA-256 bundle.json records for it."""
        full = self.require(rel)
        expected = self.files.get(rel, {}).get("sha256")
        if expected is None:
            raise EdgeLoraError(
                f"bundle.json records no hash for {rel!r}",
                path=self.manifest_path,
                hint="re-export the bundle",
            )
        self.check_digest(rel, self.hashes.sha256(full))
        return full

    def read_verified(self, rel: str, **options) -> FileBytes:
        """A bundle file read once, its SHA-256 checked against bundle.json on the bytes in hand
        (``options`` as :meth:`FileHashes.read`; with ``background=True`` the caller checks
        ``check_digest(rel, read.sha256)`` itself, after parsing and before any use)."""
        full = self.require(rel)
        recorded = self.files.get(rel, {}).get("bytes")
        recorded = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None
        if recorded is not None and full.stat().st_size > recorded:
            self.check_digest(rel, "")  # refused before reading more than bundle.json vouches for
        checked = self.hashes.read(full, max_bytes=recorded, **options)
        if not options.get("background"):
            self.check_digest(rel, checked.sha256)
        return checked

    def check_digest(self, rel: str, digest: str) -> None:
        """Refuse ``digest`` unless it is the SHA-256 bundle.json records for ``rel``."""
        expected = self.files.get(rel, {}).get("sha256")
        if expected is None:
            raise EdgeLoraError(
                f"bundle.json records no hash for {rel!r}",
                path=self.manifest_path,
                hint="re-export the bundle",
            )
        if digest != expected:
            raise EdgeLoraError(
                f"{rel!r} does not match its SHA-256 in bundle.json (modified or corrupt)",
                path=self.root,
                hint="copy the bundle again from a trusted source",
            )

    def backend_entry(self, backend: str, quant: str | None = None, variant: str | None = None) -> dict:
        entries = self.backends.get(backend) or []
        if not entries:
            raise EdgeLoraError(
                f"bundle has no {backend} files (has: {', '.join(self.backends) or 'none'})",
                path=self.root,
                hint=f"export with --backends {backend}",
            )
        for e in entries:
            if (quant is None or e.get("quant") == quant) and (
                variant is None or e.get("variant", variant) == variant
            ):
                return e
        have = ", ".join(f"{e.get('quant')}/{e.get('variant', '-')}" for e in entries)
        raise EdgeLoraError(
            f"bundle has no {backend} model with quant={quant} variant={variant} (has {have})", path=self.root
        )


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    """Write bundle.json last and atomically: before it exists, the folder is not a bundle."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
