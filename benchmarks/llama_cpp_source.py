"""The llama-cpp-python source package of the installed version, fetched through pip's own
configuration (its cache makes later fetches local). It holds llama.cpp's conversion scripts (the
benchmark's peer adapter files) and its reference vocabularies and chat templates (the tests')."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path


def installed_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def download_sdist(into: Path, timeout: float = 900) -> Path:
    """``pip download`` the installed version's source archive into ``into``; its path. Raises
    RuntimeError (with pip's last words) when pip cannot fetch it."""
    version = installed_version()
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
    got = subprocess.run(
        [*cmd, f"llama-cpp-python=={version}", "-d", str(into)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    archives = sorted(Path(into).glob("llama_cpp_python-*.tar.gz"))
    if got.returncode != 0 or not archives:
        raise RuntimeError(
            f"could not download the llama-cpp-python {version} source package: {got.stderr[-500:]}"
        )
    return archives[0]


def unpack_vendor(
    dest: Path, subdir: str, keep: Callable[[tuple[str, ...]], bool], timeout: float = 900
) -> Path:
    """``dest`` holding the source package's regular files under ``vendor/llama.cpp/<subdir>`` whose path
    below it (a tuple of parts) ``keep`` accepts: fetched and unpacked once per version, whole or not at
    all (a ``.complete`` stamp marks a finished one). Raises as :func:`download_sdist`."""
    if (dest / ".complete").is_file():
        return dest
    base = ("vendor", "llama.cpp", *Path(subdir).parts)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-src-") as tmp:
        archive = download_sdist(Path(tmp), timeout)
        staging = Path(tmp) / "unpacked"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                parts = tuple(member.name.split("/"))
                rel = parts[1 + len(base) :]
                if member.isfile() and parts[1 : 1 + len(base)] == base and rel and keep(rel):
                    target = staging.joinpath(*rel)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        (staging / ".complete").write_text(installed_version())
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(staging), dest)
    return dest
