"""A private in-memory file for a library that only opens paths (llama.cpp's LoRA loader).

The runtime copies a checked file into it, hashes the copy and lets the library read the copy by
its ``/proc/self/fd`` path: the bytes the library parses are the bytes that were hashed, whatever
happens to the file on disk meanwhile, and no other process holds the copy. Where there is no
``memfd_create`` (macOS, Windows), an unlinked-on-exit file in a private (0700) folder stands in.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def private_file(folder: str | os.PathLike, name: str = "adapter") -> Iterator[tuple[int, Path]]:
    """``(fd, path)`` of an empty private file, closed (and removed) on exit; ``folder`` holds the
    stand-in where there is no memfd (the engine's own temporary folder)."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create(f"edge-lora-{name}", os.MFD_CLOEXEC)
        try:
            yield fd, Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".gguf", dir=folder)
    try:
        yield fd, Path(path)
    finally:
        os.close(fd)
        Path(path).unlink(missing_ok=True)
