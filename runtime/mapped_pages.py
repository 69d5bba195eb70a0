"""Give memory the process no longer reads back to the system: mapped file pages, freed heap.

ONNX Runtime maps ``model.onnx.data`` and reads every int4 weight through that mapping to prepack
it into memory of its own; the mapping stays (the tied embedding's rows are gathered from it), so
the touched file pages stay resident: a second copy of the weights in the process's RSS.
``madvise(MADV_PAGEOUT)`` (Linux 5.4+, Android 11+) takes them out of the process;
a page read later (an embedding row) comes back from the file on demand.

PAGEOUT never loses data: it swaps an anonymous page out (or leaves it) and drops only clean file
pages. That matters because a mapping read from /proc/self/smaps can be unmapped, and its
addresses reused by the allocator, before ``madvise`` runs: with ``MADV_DONTNEED`` that race zeroed
live heap memory and aborted the process ("free(): invalid pointer") when done during a load. So
DONTNEED (the fallback on older kernels) is used only while no other thread runs (``quiet=True``).
Paging out on a thread during the load as well cut the 0.5B load's peak by 40-80 MB but made the
load 0.3-0.8 s slower (2 busy cores), against the cold-start target, so the engine does it once, after.
Linux and Android only; elsewhere nothing happens. The kernel pages out file pages only for the
file's owner or a process that may write it (the app's own bundle); otherwise nothing happens.

A mapping this process made itself and holds (the C API engine's map of the data file, which ONNX
Runtime reads its shared weights through) has no such race: :func:`dropping_pages` gives its pages
back with DONTNEED every few milliseconds while a session is created over it. DONTNEED on a shared
read-only file map only unmaps: the pages stay in the page cache (a later read is a minor fault, no
disk), unlike PAGEOUT, which evicts them, so the load does not slow down (Qwen2.5-0.5B int4: the
LoRA session's open peaked at +350 MB of file pages on top of the prepacked weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MADV_DONTNEED, MADV_PAGEOUT = 4, 21
_state: dict = {"libc": None, "pageout": None}  # pageout: None until tried, then whether the kernel has it


def release_pages(path: str | os.PathLike, quiet: bool = False) -> int:
    """Take this process's resident pages of ``path``'s mappings out; returns the bytes advised.
    ``quiet``: no other thread maps or unmaps memory now, so DONTNEED is safe where PAGEOUT is missing."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        spans = _clean_mappings(os.fspath(Path(path).resolve()))
        libc = _libc()
    except (OSError, AttributeError):  # no /proc or no madvise: memory stays as it was, nothing breaks
        return 0
    done = 0
    for start, end in spans:
        if _state["pageout"] is not False:
            ok = libc.madvise(start, end - start, MADV_PAGEOUT) == 0
            if not ok and ctypes.get_errno() == errno.EINVAL and _state["pageout"] is None:
                _state["pageout"] = False  # an older kernel: fall through to DONTNEED
            else:
                _state["pageout"] = True
                done += (end - start) if ok else 0
                continue
        if quiet and libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            done += end - start
    return done


def drop_own_pages(mapping: np.memmap) -> bool:
    """Unmap the resident pages of ``mapping`` (a read-only map this process holds) from the process;
    its contents stay the file's, read back from the page cache on the next touch."""
    if not sys.platform.startswith("linux") or mapping.size == 0:
        return False
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return False
    return libc.madvise(mapping.ctypes.data, mapping.nbytes, MADV_DONTNEED) == 0


@contextlib.contextmanager
def dropping_pages(mapping: np.memmap | None, every_s: float = 0.01) -> Iterator[None]:
    """While the block runs (ONNX Runtime reading ``mapping`` to prepack, in C, without the GIL), give
    the pages it read back every ``every_s`` seconds, and once more at the end: the load holds the
    prepacked copy plus a few milliseconds' worth of file pages, not the whole file on top."""
    if mapping is None or not drop_own_pages(mapping):
        yield
        return
    done = threading.Event()

    def drop() -> None:
        while not done.wait(every_s):
            drop_own_pages(mapping)

    thread = threading.Thread(target=drop, name="edge-lora-drop-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        drop_own_pages(mapping)


def _libc():
    if _state["libc"] is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _state["libc"] = libc
    return _state["libc"]


def _clean_mappings(target: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each mapping of ``target`` without pages this process wrote (copy-on-write, counted
    as "Anonymous" in /proc/self/smaps; "Private_Dirty" also counts file pages not yet written back)."""
    spans, current = [], None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if not fields[0].endswith(":"):  # a mapping's header: "start-end perms offset dev inode path"
                current = None
                if len(fields) >= 6 and " ".join(fields[5:]) == target:
                    start, end = (int(v, 16) for v in fields[0].split("-"))
                    current = [start, end, True]
                    spans.append(current)
            elif current is not None and fields[0] == "Anonymous:" and int(fields[1]) > 0:  # copy-on-write
                current[2] = False
    return [(s, e) for s, e, clean in spans if clean]


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; elsewhere nothing).

    A session freed on one thread leaves its prepacked weights as free pages of that thread's malloc
    arena; a session then loaded on another thread allocates from its own arena, so without this
    the process holds both copies (measured: SmolLM2-135M +86 MB, Qwen2.5-0.5B +415 MB)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))
