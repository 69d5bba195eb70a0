"""The llama-cpp-python source package of the installed version, fetched through pip's own
configuration (its cache makes later fetches local). It holds llama.cpp's conversion scripts (the
benchmark's peer adapter files) and its reference vocabularies and chat templates (the tests')."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
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
