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
                           "onnx": "adapters/sql.onnx_adapter", "gguf": "adapters/sql.gguf"},
                   "dora": {"source": ..., "gguf_variants": {"q4_0": "adapters/dora.merged-q4_0.gguf"}}},
      "files": {"adapters/sql.safetensors": {"sha256": "...", "bytes": 123}, ...}
    }

Every path is relative to the bundle and must stay inside it (no ``..``, no absolute paths, no
symlinks out). A bundle is valid only once bundle.json is in place: writers put it last.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.atomic import atomic_write_text
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.file_hashes import FileBytes, FileHashes
from edge_lora.file_hashes import sha256_file as sha256_file  # importers of the bundle format use it

FORMAT = "edge-lora-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
ADAPTER_FILE_KEYS = ("source", "onnx", "gguf")
# an adapter no GGUF LoRA can express (DoRA, LoRA on a tied head) may ship merged into a copy of each
# GGUF base: {"quant": "adapters/<name>.merged-<quant>.gguf"} (export --gguf-merged-variants)
VARIANTS_KEY = "gguf_variants"


def adapter_files(entry: dict) -> list[str]:
    """Every file an adapter entry of bundle.json names, in the entry's order (its merged variants last)."""
    files = [v for k, v in entry.items() if k in ADAPTER_FILE_KEYS]
    variants = entry.get(VARIANTS_KEY)
    if isinstance(variants, dict):
        files += list(variants.values())
    elif variants is not None:
        files.append(variants)  # not a mapping: refused by the path check as it is
    return files


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
        raw = _read_manifest(root, manifest)
        _check_manifest(raw, manifest)
        bundle = cls(
            root=root,
            config=_model_config(raw, manifest),
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
            refs += adapter_files(entry)
        for ref in refs:
            self.resolve(ref)

    def resolve(self, rel: object) -> Path:
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
        self._recorded_sha256(rel)  # refused before the file is hashed
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
        if digest != self._recorded_sha256(rel):
            raise EdgeLoraError(
                f"{rel!r} does not match its SHA-256 in bundle.json (modified or corrupt)",
                path=self.root,
                hint="copy the bundle again from a trusted source",
            )

    def _recorded_sha256(self, rel: str) -> str:
        expected = self.files.get(rel, {}).get("sha256")
        if expected is None:
            raise EdgeLoraError(
                f"bundle.json records no hash for {rel!r}",
                path=self.manifest_path,
                hint="re-export the bundle",
            )
        return expected

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


def _read_manifest(root: Path, manifest: Path) -> object:
    """bundle.json parsed, with one clear error for a missing folder, a missing, huge or unparsable file."""
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
        raise EdgeLoraError("bundle.json is implausibly large", path=manifest, hint="re-export the bundle")
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # Recursion: hostile nesting
        raise EdgeLoraError(
            f"bundle.json is not valid JSON ({err.__class__.__name__})",
            path=manifest,
            hint="re-export the bundle",
        ) from None
    return raw


def _check_manifest(raw: object, manifest: Path) -> None:
    """Refuse anything but an edge-lora manifest this version reads, with every key of the right kind."""
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


# bundle.json's model keys a config cannot do without: ModelConfig's fields with no default, in its
# order (architecture, then the sizes; the C library checks the same list)
REQUIRED_MODEL_KEYS = tuple(
    f.name
    for f in dataclasses.fields(ModelConfig)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def _check_model_keys(model: dict, manifest: Path) -> None:
    """Missing or mistyped keys named plainly, before the config is built (not Python's TypeError text)."""
    missing = [k for k in REQUIRED_MODEL_KEYS if k not in model]
    if missing:
        raise EdgeLoraError(
            f"bundle.json: bad model config (missing {', '.join(missing)})",
            path=manifest,
            hint="re-export the bundle",
        )
    if not isinstance(model["architecture"], str):
        raise EdgeLoraError(
            "bundle.json: bad model config (architecture is not a string)",
            path=manifest,
            hint="re-export the bundle",
        )
    for key in REQUIRED_MODEL_KEYS[1:]:
        if type(model[key]) is not int:
            raise EdgeLoraError(
                f"bundle.json: bad model config ({key} is not an integer)",
                path=manifest,
                hint="re-export the bundle",
            )


def _model_config(raw: dict, manifest: Path) -> ModelConfig:
    _check_model_keys(raw["model"], manifest)
    try:
        config = ModelConfig.from_saved(raw["model"])
        config.validate(manifest)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as err:
        raise EdgeLoraError(
            f"bundle.json: bad model config ({err})", path=manifest, hint="re-export the bundle"
        ) from None
    return config


def write_manifest(root: str | os.PathLike, manifest: dict) -> None:
    """Write bundle.json last and atomically: before it exists, the folder is not a bundle."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
