"""Giving back a mapped file's resident pages (runtime.mapped_pages): RSS drops, the bytes stay the same,
and a mapping with written (private) pages is left alone."""

import mmap
import os
import sys
import threading

import numpy as np
import pytest

from runtime.mapped_pages import drop_own_pages, dropping_pages, release_pages, trim_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, mine = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if fields and not fields[0].endswith(":"):
            mine = len(fields) >= 6 and fields[5] == str(path)
        elif mine and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def test_clean_pages_go_and_come_back_the_same(tmp_path):
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean page-cache pages, as an exported bundle's are
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page touched
    before = _resident_kb(path.resolve())
    assert before > 7 << 10
    assert release_pages(path, quiet=True) >= 8 << 20
    assert _resident_kb(path.resolve()) < before // 4
    np.testing.assert_array_equal(mapped, data)  # read back on demand, unchanged


def test_written_private_pages_are_kept(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(4 << 20))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m[:4] = b"edit"  # a copy-on-write page: only this process has it
        m[4096 * 100 : 4096 * 100 + 4] = b"more"
        assert release_pages(path, quiet=True) == 0
        assert m[:4] == b"edit" and m[4096 * 100 : 4096 * 100 + 4] == b"more"
        m.close()
    assert release_pages(tmp_path / "not-mapped.bin") == 0
    assert isinstance(trim_heap(), bool)


def test_own_map_dropped_while_read_and_read_back_the_same(tmp_path):
    """A reader thread sums the map page by page (as ONNX Runtime prepacks from it) while
    ``dropping_pages`` gives pages back: the sums are right and little of the file stays resident."""
    path = tmp_path / "weights.bin"
    data = np.random.default_rng(1).integers(0, 255, 16 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    expected = data.reshape(-1, 4096).sum(axis=1, dtype=np.int64)
    sums = []

    def read() -> None:
        for _ in range(3):
            sums.append(mapped.reshape(-1, 4096).sum(axis=1, dtype=np.int64))

    with dropping_pages(mapped, every_s=0.001):
        reader = threading.Thread(target=read)
        reader.start()
        reader.join()
    for got in sums:
        np.testing.assert_array_equal(got, expected)
    assert _resident_kb(path.resolve()) < 1 << 10  # dropped once more at the end
    np.testing.assert_array_equal(mapped[::4096], data[::4096])
    assert drop_own_pages(mapped)
    with dropping_pages(None):  # the Python-binding path has no map of its own: nothing happens
        pass
