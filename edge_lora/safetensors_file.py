"""A defensive safetensors reader and an atomic writer, numpy only.

The ``safetensors`` package trusts the header more than a file from a network deserves and
cannot give bf16 to numpy; this reader checks every offset against the file size before it
touches data (no memory bomb, no overlap), and widens bf16 to float32 itself.
Layout: 8-byte little-endian header length, a JSON header, then the data block.
Small files (adapters) are best read whole with :meth:`SafetensorsFile.read_all`: one read into
one buffer, every tensor a view of it; large ones (base models) tensor by tensor from a memory map.
A file whose bytes the caller already holds (read once and hash-checked: the runtime's adapters)
is parsed from them with ``SafetensorsFile(path, data=...)``: zero-copy views, no second read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.atomic import atomic_write_bytes
from edge_lora.errors import EdgeLoraError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
ITEMSIZE = {name: np.dtype(kind).itemsize for name, kind in DTYPES.items()}
# float dtype -> (unsigned view, mask dropping the sign, all-ones exponent): a value is NaN or Inf
# exactly when its magnitude bits reach the all-ones exponent
NONFINITE_BITS = {
    "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
    "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
}
SCAN_CHUNK = 1 << 18  # elements per masked max(): the temporary stays in cache
NUMPY_TO_ST = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


class SafetensorsFile:
    """Open once, validate the whole header, then read tensors lazily from a memory map."""

    def __init__(self, path: str | os.PathLike, data: bytes | bytearray | memoryview | None = None):
        """``data``: the file's bytes already in memory (read once and hash-checked by the caller):
        everything is parsed from them and the file is never opened."""
        self.path = Path(path)
        self._buffer = None if data is None else memoryview(data).cast("B")
        if self._buffer is not None:
            size = len(self._buffer)
            n = self._header_length(bytes(self._buffer[:8]), size)
            raw = bytes(self._buffer[8 : 8 + n])
        else:
            if not self.path.exists():
                raise EdgeLoraError("file not found", path=self.path, hint="check the path")
            if not self.path.is_file():
                raise EdgeLoraError(
                    "expected a .safetensors file, found a directory or special file",
                    path=self.path,
                    hint="pass the file itself",
                )
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                size = stat.st_size
                self._identity = (
                    stat.st_dev,
                    stat.st_ino,
                    size,
                )  # read_all refuses a file swapped or resized since
                n = self._header_length(f.read(8), size)
                raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (
            UnicodeDecodeError,
            json.JSONDecodeError,
            RecursionError,
        ):  # RecursionError: hostile nesting depth
            raise EdgeLoraError(
                "safetensors header is not valid JSON",
                path=self.path,
                hint="the file is corrupt; copy it again",
            ) from None
        if not isinstance(header, dict):
            raise EdgeLoraError(
                "safetensors header is not a JSON object",
                path=self.path,
                hint="the file is corrupt; copy it again",
            )
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise EdgeLoraError(
                "safetensors __metadata__ must map strings to strings",
                path=self.path,
                hint="the file is corrupt; copy it again",
            )
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n
        self._block: np.ndarray | None = None  # the data block, once read_all has read it
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            info = self._parse_entry(name, entry, size)
            self.tensors[name] = info
            spans.append((info.start, info.end, name))
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise EdgeLoraError(
                    f"tensors {n0!r} and {n1!r} overlap",
                    path=self.path,
                    hint="the file is corrupt; copy it again",
                )
        self._map = None

    def _header_length(self, head: bytes, size: int) -> int:
        if len(head) < 8:
            raise EdgeLoraError(
                "not a safetensors file (too short)",
                path=self.path,
                hint="the file is empty or truncated; copy it again",
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise EdgeLoraError(
                f"safetensors header length {n} does not fit the file ({size} bytes)",
                path=self.path,
                hint="the file is truncated or corrupt; copy it again",
            )
        return n

    def _parse_entry(self, name, entry, size) -> TensorInfo:
        # one pass per field (type() is, not isinstance: a bool is no size); a header lists hundreds of tensors
        bad = lambda why: EdgeLoraError(
            f"tensor {name!r}: {why}", path=self.path, hint="the file is corrupt or not a tensor file"
        )  # noqa: E731
        if type(entry) is not dict:
            raise bad("header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise bad(f"unsupported dtype {dtype!r}")
        if type(shape) is not list:
            raise bad("shape must be a list of non-negative integers")
        count = 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise bad("shape must be a list of non-negative integers")
            count *= d
        if not (
            type(offsets) is list
            and len(offsets) == 2
            and type(offsets[0]) is int
            and type(offsets[1]) is int
        ):
            raise bad("data_offsets must be two integers")
        begin, end = offsets
        nbytes = count * ITEMSIZE[dtype]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise bad(f"data_offsets {offsets} do not match shape {shape} of {dtype}")
        if self.data_start + end > size:
            raise bad(
                f"data ends at byte {self.data_start + end} beyond the file's {size} bytes (truncated?)"
            )
        return TensorInfo(dtype, tuple(shape), self.data_start + begin, self.data_start + end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def raw_bytes(self, name: str) -> memoryview:
        info = self.tensors[name]
        return memoryview(self._mmap())[info.start : info.end]

    def get(self, name: str, *, widen_bf16: bool = True) -> np.ndarray:
        """The tensor as a numpy array (a copy; bf16 widened to float32)."""
        info = self.tensors[name]
        buf = self._mmap()[info.start : info.end]
        arr = np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)
        if info.dtype == "BF16" and widen_bf16:
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.copy()

    def read_all(self) -> dict[str, np.ndarray]:
        """Every tensor at once: the data block read with one call into one buffer, each tensor a
        view of it (no per-tensor copies, no page faults on a map; bf16 widened to float32).

        The arrays are private memory: a file changed after this returns cannot change them. A file
        truncated or replaced since its header was checked is refused.
        """
        end = max((info.end for info in self.tensors.values()), default=self.data_start)
        if self._buffer is not None:  # bytes in hand: every tensor a view of them, nothing read or copied
            block = np.frombuffer(
                self._buffer, dtype=np.uint8, count=end - self.data_start, offset=self.data_start
            )
            self._block = block
            return {name: self._view(block, info) for name, info in self.tensors.items()}
        # a bytearray, not np.empty: numpy asks the kernel for huge pages above 4 MiB, and on the
        # benchmark VM a first touch of fresh huge pages cost 40-60 ms per 20 MB about half the time
        # (ordinary pages: a steady ~9 ms)
        block = np.frombuffer(bytearray(end - self.data_start), dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            stat = os.fstat(f.fileno())
            if (stat.st_dev, stat.st_ino, stat.st_size) != self._identity:
                raise EdgeLoraError(
                    "the file changed while it was being read",
                    path=self.path,
                    hint="read it again once it is written",
                )
            f.seek(self.data_start)
            _read_exactly(f, memoryview(block), self.path)
        self._block = block
        return {name: self._view(block, info) for name, info in self.tensors.items()}

    def first_nonfinite(self) -> str | None:
        """The first float tensor holding NaN or Inf, or None (reads the file if read_all has not).

        Tensors lying back to back with one dtype are scanned as one run of raw bits (an all-linear
        adapter has hundreds of small tensors: a numpy call per tensor cost more than the scan).
        """
        if self._block is None:
            self.read_all()
        for dtype, names in self._runs():
            if not self._bits_finite(dtype, self.tensors[names[0]].start, self.tensors[names[-1]].end):
                return next(
                    n
                    for n in names
                    if not self._bits_finite(dtype, self.tensors[n].start, self.tensors[n].end)
                )
        return None

    def _runs(self):
        """``(dtype, [names])`` for each run of back-to-back float tensors of one dtype, in file order."""
        run: list[str] = []
        for name in sorted(self.tensors, key=lambda n: self.tensors[n].start):
            info = self.tensors[name]
            if info.dtype not in NONFINITE_BITS:
                continue
            if run and (self.tensors[run[-1]].dtype != info.dtype or self.tensors[run[-1]].end != info.start):
                yield self.tensors[run[0]].dtype, run
                run = []
            run.append(name)
        if run:
            yield self.tensors[run[0]].dtype, run

    def _bits_finite(self, dtype: str, start: int, end: int) -> bool:
        kind, mask, limit = NONFINITE_BITS[dtype]
        raw = self._block[start - self.data_start : end - self.data_start]
        bits = (raw if raw.ctypes.data % np.dtype(kind).itemsize == 0 else raw.copy()).view(kind)
        return all(
            int((bits[i : i + SCAN_CHUNK] & mask).max()) < limit for i in range(0, bits.size, SCAN_CHUNK)
        )

    def _view(self, block: np.ndarray, info: TensorInfo) -> np.ndarray:
        offset = info.start - self.data_start
        arr = block[offset : offset + info.end - info.start].view(DTYPES[info.dtype]).reshape(info.shape)
        if info.dtype == "BF16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr if arr.flags.aligned else arr.copy()  # a tensor at an odd offset: aligned for fast math

    def _mmap(self):
        if self._map is None and self._buffer is not None:
            self._map = np.frombuffer(self._buffer, dtype=np.uint8)
        if self._map is None:
            if self.path.stat().st_size == 0:
                self._map = b""
            else:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map


def _read_exactly(f, into: memoryview, path: Path) -> None:
    done = 0
    while done < len(into):
        n = f.readinto(into[done:])
        if not n:
            raise EdgeLoraError(
                "the file ended before its last tensor (truncated while being read?)",
                path=path,
                hint="copy the file again",
            )
        done += n


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}, f.metadata


def serialize(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    blobs = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in NUMPY_TO_ST:
            raise EdgeLoraError(f"cannot store tensor {name!r} of dtype {arr.dtype}")
        data = arr.tobytes()
        header[name] = {
            "dtype": NUMPY_TO_ST[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # data block aligned to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write atomically: a crash leaves the old file or the new one."""
    atomic_write_bytes(path, serialize(tensors, metadata))
