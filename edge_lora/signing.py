"""Ed25519 signatures for adapter files and bundles.

A signature is a detached ``<file>.sig`` JSON next to the file it covers::

    {"format": "edge-lora-signature", "version": 1, "algorithm": "ed25519",
     "key_id": "<16 hex>", "sha256": "<hex of the file>", "signature": "<base64>"}

The signed message is a fixed domain prefix plus the file's SHA-256, so a signature made for an
edge-lora file can never be replayed as a signature over anything else. Signing a bundle signs its
bundle.json, which records the SHA-256 of every file in the bundle: one signature covers them all.

``cryptography`` is imported lazily: a runtime without the ``sign`` extra still loads unsigned
bundles as long as no ``trusted_keys`` are given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.atomic import atomic_write_bytes, atomic_write_text
from edge_lora.bundle import Bundle, FileHashes, adapter_files, sha256_file
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from typing import TypeAlias

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIG_SUFFIX = ".sig"
SIG_FORMAT = "edge-lora-signature"
SIG_VERSION = 1
DOMAIN = b"edge-lora-signature-v1\n"
MAX_SIG_BYTES = 64 * 1024
MAX_KEY_BYTES = 64 * 1024
INSTALL_HINT = "pip install 'edge-lora[sign]'"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EdgeLoraError("signatures need the cryptography package", hint=INSTALL_HINT) from None
    return ed25519, serialization, InvalidSignature


@dataclass(frozen=True)
class PublicKey:
    raw: bytes  # the 32-byte Ed25519 public key

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, signature: bytes, message: bytes) -> bool:
        ed25519, _, invalid = _crypto()
        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except invalid:
            return False
        return True


if TYPE_CHECKING:
    # what :func:`load_public_key` takes: a key file, raw bytes or a key object
    KeySource: TypeAlias = PublicKey | Ed25519PublicKey | bytes | bytearray | str | os.PathLike
    # what :func:`load_trusted_keys` takes: one of them, or a collection of them
    KeySources: TypeAlias = (
        KeySource | list[KeySource] | tuple[KeySource, ...] | set[KeySource] | frozenset[KeySource]
    )
    # what the verifiers take: those, or what :func:`load_trusted_keys` returns
    TrustedKeys: TypeAlias = dict[str, PublicKey] | KeySources
    # a private key file or the key itself
    PrivateKeySource: TypeAlias = Ed25519PrivateKey | str | os.PathLike


def signature_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path) + SIG_SUFFIX)


def _message(sha256_hex: str) -> bytes:
    return DOMAIN + bytes.fromhex(sha256_hex)


# --- keys -------------------------------------------------------------------------------


def generate_keypair(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<prefix>.key`` (private, PEM, mode 0600) and ``<prefix>.pub`` (public, PEM)."""
    ed25519, serialization, _ = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for existing in (key_path, pub_path):
        if existing.exists():
            raise EdgeLoraError(
                "refusing to overwrite an existing key",
                path=existing,
                hint="pick another name or delete it first",
            )
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(key_path, pem, mode=0o600)  # private from its first byte
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write_bytes(pub_path, public)
    return key_path, pub_path


def _read_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise EdgeLoraError("key file not found or not a file", path=path)
    if path.stat().st_size > MAX_KEY_BYTES:
        raise EdgeLoraError("key file is implausibly large", path=path, hint="pass an Ed25519 key file")
    return path.read_bytes()


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS8) file, as ``edge-lora keygen`` writes it."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise EdgeLoraError(
            "not an unencrypted PEM private key", path=path, hint="make one with `edge-lora keygen NAME`"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgeLoraError(
            "the private key is not Ed25519", path=path, hint="make one with `edge-lora keygen NAME`"
        )
    return key


def load_public_key(key: KeySource) -> PublicKey:
    """A public key from a PEM file, a raw 32-byte or 64-hex-character file, raw bytes, or a key object."""
    if isinstance(key, PublicKey):
        return key
    if isinstance(key, (bytes, bytearray)) and len(key) == 32:
        return PublicKey(bytes(key))
    ed25519, serialization, _ = _crypto()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return PublicKey(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    if not isinstance(key, (str, os.PathLike)):
        raise EdgeLoraError(f"trusted key {key!r} is not a key file, 32 raw bytes or an Ed25519 public key")
    path = Path(key)
    data = _read_key_file(path)
    if len(data) == 32 and not data.startswith(b"-----"):
        return PublicKey(data)
    text = data.strip()
    if len(text) == 64:
        try:
            return PublicKey(binascii.unhexlify(text))
        except binascii.Error:
            pass
    try:
        loaded = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise EdgeLoraError(
            "not an Ed25519 public key (PEM, 32 raw bytes or 64 hex characters)",
            path=path,
            hint="pass the .pub file `edge-lora keygen` wrote",
        ) from None
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise EdgeLoraError("the public key is not Ed25519", path=path)
    return PublicKey(loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def load_trusted_keys(keys: KeySources) -> dict[str, PublicKey]:
    """key id -> key, from a list of anything :func:`load_public_key` takes."""
    if not isinstance(keys, (list, tuple, set, frozenset)):  # one key given on its own
        keys = [keys]
    loaded = [load_public_key(k) for k in keys]
    return {k.key_id: k for k in loaded}


# --- files ------------------------------------------------------------------------------


def sign_file(path: str | os.PathLike, private_key: PrivateKeySource) -> Path:
    """Write ``<path>.sig``; ``private_key`` is a key file path or an Ed25519 private key object."""
    path = Path(path)
    if not path.is_file():
        raise EdgeLoraError("cannot sign: not a file", path=path)
    key = private_key if hasattr(private_key, "sign") else load_private_key(private_key)
    _, serialization, _ = _crypto()
    public = PublicKey(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    digest = sha256_file(path)
    record = {
        "format": SIG_FORMAT,
        "version": SIG_VERSION,
        "algorithm": "ed25519",
        "key_id": public.key_id,
        "file": path.name,
        "sha256": digest,
        "signature": base64.b64encode(key.sign(_message(digest))).decode("ascii"),
    }
    out = signature_path(path)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    return out


def read_signature(sig_path: Path) -> dict:
    """Parse and shape-check a ``.sig`` file (it came over the network like the file it covers)."""
    if not sig_path.is_file():
        raise EdgeLoraError(
            "no signature (expected a .sig file beside it)",
            path=sig_path.with_suffix(""),
            hint="sign it with `edge-lora sign --key KEY FILE` on a trusted machine",
        )
    if sig_path.stat().st_size > MAX_SIG_BYTES:
        raise EdgeLoraError("signature file is implausibly large", path=sig_path)
    try:
        record = json.loads(sig_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeLoraError(
            "signature file is not valid JSON", path=sig_path, hint="sign the file again"
        ) from None
    if not isinstance(record, dict) or record.get("format") != SIG_FORMAT:
        raise EdgeLoraError("not an edge-lora signature file", path=sig_path)
    if record.get("version") != SIG_VERSION or record.get("algorithm") != "ed25519":
        raise EdgeLoraError(
            f"unsupported signature version/algorithm {record.get('version')!r}/{record.get('algorithm')!r}",
            path=sig_path,
            hint="upgrade edge-lora",
        )
    for key in ("key_id", "sha256", "signature"):
        if not isinstance(record.get(key), str):
            raise EdgeLoraError(f"signature file lacks {key!r}", path=sig_path)
    try:
        record["_sha256_bytes"] = bytes.fromhex(record["sha256"])
        record["_signature_bytes"] = base64.b64decode(record["signature"], validate=True)
    except (ValueError, binascii.Error):
        raise EdgeLoraError("signature file holds malformed hex or base64", path=sig_path) from None
    if len(record["_sha256_bytes"]) != 32 or len(record["_signature_bytes"]) != 64:
        raise EdgeLoraError("signature file holds a hash or signature of the wrong length", path=sig_path)
    return record


def verify_file(path: str | os.PathLike, trusted_keys: TrustedKeys, hashes: FileHashes | None = None) -> str:
    """Check ``<path>.sig`` against the file and the trusted keys; return the signer's key id.

    ``trusted_keys`` is what :func:`load_trusted_keys` returns (or a list it accepts); ``hashes``
    remembers digests of unchanged files (an engine's, so a re-added adapter is not read again).
    """
    path = Path(path)
    record = read_signature(signature_path(path))
    if not path.is_file():
        raise EdgeLoraError("signed file is missing or not a file", path=path)
    digest = hashes.sha256(path) if hashes is not None else sha256_file(path)
    return verify_digest(path, digest, trusted_keys, record)


def verify_digest(
    path: str | os.PathLike, digest: str, trusted_keys: TrustedKeys, record: dict | None = None
) -> str:
    """Check ``<path>.sig`` against ``digest``, the SHA-256 of the bytes the caller read and will use
    (not of the file as it is now); return the signer's key id."""
    path = Path(path)
    trusted = trusted_keys if isinstance(trusted_keys, dict) else load_trusted_keys(trusted_keys)
    record = record if record is not None else read_signature(signature_path(path))
    if digest != record["sha256"]:
        raise EdgeLoraError(
            "file does not match its signature (modified after signing)",
            path=path,
            hint="copy it again from a trusted source",
        )
    key = trusted.get(record["key_id"])
    if key is None:
        raise EdgeLoraError(
            f"signed by key {record['key_id']}, which is not a trusted key",
            path=path,
            hint="pass the signer's .pub file in trusted_keys / --key",
        )
    if not key.verify(record["_signature_bytes"], _message(digest)):
        raise EdgeLoraError(
            "signature is invalid (tampered file or signature)",
            path=path,
            hint="copy it again from a trusted source",
        )
    return key.key_id


# --- bundles ----------------------------------------------------------------------------


def sign_bundle(root: str | os.PathLike, private_key: PrivateKeySource) -> list[Path]:
    """Sign bundle.json (which hashes every file) and each adapter file, so adapters can travel alone."""
    bundle = Bundle.open(root)
    key = private_key if hasattr(private_key, "sign") else load_private_key(private_key)
    for rel in bundle.files:  # never sign a bundle whose files already disagree with it
        bundle.verify_file(rel)
    written = [sign_file(bundle.manifest_path, key)]
    for rel in sorted(_adapter_files(bundle)):
        written.append(sign_file(bundle.require(rel), key))
    return written


def verify_bundle(root: str | os.PathLike, trusted_keys: TrustedKeys | None = None) -> dict:
    """Check every file against bundle.json's hashes and, with keys, bundle.json's signature.

    Returns ``{"files": n_checked, "signer": key_id or None}``.
    """
    bundle = Bundle.open(root)
    signer = None
    if trusted_keys is not None:
        signer = verify_file(bundle.manifest_path, trusted_keys)
    for rel in bundle.files:
        bundle.verify_file(rel)
    for rel in _adapter_files(bundle):
        if rel not in bundle.files:
            raise EdgeLoraError(
                f"bundle.json records no hash for adapter file {rel!r}",
                path=bundle.manifest_path,
                hint="re-export the bundle",
            )
    return {"files": len(bundle.files), "signer": signer}


def _adapter_files(bundle: Bundle) -> set[str]:
    return {rel for entry in bundle.adapters.values() for rel in adapter_files(entry)}


class AdapterTrust:
    """The runtime's rule when ``trusted_keys`` are given: no adapter is used unless a trusted key
    vouches for it.

    A bundle adapter's file is vouched for by a valid ``bundle.json.sig`` plus its SHA-256 there, or by
    its own ``.sig``; an adapter file from elsewhere needs its own ``.sig``. Only the files an engine
    reads are checked (the .safetensors; llama.cpp also the .gguf), on the bytes it read: :meth:`vouch`.
    """

    def __init__(self, bundle: Bundle, trusted_keys: KeySources):
        self.bundle = bundle
        self.keys = load_trusted_keys(trusted_keys)
        self.bundle_signed = signature_path(bundle.manifest_path).exists()
        if self.bundle_signed:  # a present but bad bundle signature is tampering: refuse the whole bundle
            verify_file(bundle.manifest_path, self.keys)

    def vouch(self, path: Path, entry: dict | None, rel: str | None, digest: str) -> None:
        """Refuse bytes no trusted key vouches for: ``digest`` is the SHA-256 of the bytes of ``path``
        (the bundle's ``rel`` when it is one) that the caller read and will use.

        The signed bundle.json vouches for its own files, an adapter's ``.sig`` for that file alone."""
        if entry is not None and self.bundle_signed:
            self.bundle.check_digest(rel, digest)
            return
        if self.bundle_signed and not signature_path(path).exists():
            rel = rel or self._bundle_relative(path)
            if rel is not None and rel in self.bundle.files:
                self.bundle.check_digest(rel, digest)
                return
        verify_digest(path, digest, self.keys)

    def _bundle_relative(self, source: Path) -> str | None:
        try:
            return Path(os.path.realpath(source)).relative_to(os.path.realpath(self.bundle.root)).as_posix()
        except ValueError:
            return None
