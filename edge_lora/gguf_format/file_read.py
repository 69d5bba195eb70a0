"""Reading a GGUF file that may be hostile: its layout checked before gguf-py's reader sees it.

gguf-py's ``GGUFReader`` trusts the counts in the file: an array that claims 2**63 items past the end
of a truncated file makes it loop for ever on empty reads, and a tensor whose data lies past the end
becomes a short view that fails later, somewhere else. :func:`check_layout` walks the header first
with every count, length and offset bounded by the file's size (numbers only, nothing allocated from
them), so :func:`open_gguf` hands the reader only a file whose every part lies inside it. Little-endian
GGUF v2/v3 only (what llama.cpp writes). Any fault is one :class:`EdgeLoraError` naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    import gguf

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# value type -> item size for the fixed-size scalars (gguf.GGUFValueType numbering)
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
_HINT = "the GGUF file is truncated or corrupt; download it again"


@dataclass(frozen=True)
class TensorSpan:
    name: str
    shape: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    type_id: int
    start: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounded little-endian reads over the mapped file; running past the end is a one-line error."""

    def __init__(self, data: mmap.mmap | bytes, path: Path):
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)

    def fail(self, what: str) -> EdgeLoraError:
        return EdgeLoraError(f"{what} (at byte {self.pos} of {self.size})", path=self.path, hint=_HINT)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file")

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        self.need(n, what)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_value(self, kind: int, key: str, nested: bool = False) -> None:
        if kind in SCALAR_SIZES:
            self.need(SCALAR_SIZES[kind], f"value of {key}")
            self.pos += SCALAR_SIZES[kind]
        elif kind == STRING:
            n = self.unpack("Q", f"value of {key}")
            self.need(n, f"value of {key}")
            self.pos += n
        elif kind == ARRAY and not nested:
            item, count = self.unpack("I", f"array {key}"), self.unpack("Q", f"array {key}")
            if item in SCALAR_SIZES:
                self.need(count * SCALAR_SIZES[item], f"array {key} ({count} items)")
                self.pos += count * SCALAR_SIZES[item]
            elif item == STRING:
                self.need(count * 8, f"array {key} ({count} items)")  # each item at least its length
                for _ in range(count):
                    self.skip_value(STRING, key, nested=True)
            else:
                raise self.fail(f"array {key} has items of unsupported type {item}")
        else:
            raise self.fail(f"key {key} has unsupported value type {kind}")


def check_layout(path: str | os.PathLike) -> list[TensorSpan]:
    """Walk the header of ``path``; every tensor's data must lie inside the file. Returns the tensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise EdgeLoraError(f"not a GGUF file ({size} bytes)", path=path, hint=_HINT)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _walk(_Cursor(data, path))
    except OSError as err:
        raise EdgeLoraError(f"cannot read the GGUF file ({err.strerror})", path=path) from None


def _walk(cur: _Cursor) -> list[TensorSpan]:
    if bytes(cur.data[:4]) != MAGIC:
        raise EdgeLoraError("not a GGUF file (bad magic)", path=cur.path, hint="pass a .gguf model file")
    cur.pos = 4
    version = cur.unpack("I", "version")
    if version not in VERSIONS:
        what = "a big-endian GGUF" if version & 0xFFFF == 0 else f"GGUF version {version}"
        raise EdgeLoraError(
            f"{what} is not supported", path=cur.path, hint="llama.cpp writes v3, little-endian"
        )
    n_tensors, n_keys = cur.unpack("Q", "tensor count"), cur.unpack("Q", "key count")
    cur.need(n_keys * 12 + n_tensors * 24, f"the header ({n_keys} keys, {n_tensors} tensors)")  # least sizes
    alignment, keys = DEFAULT_ALIGNMENT, set()
    for _ in range(n_keys):
        key = cur.string("key name")
        if key in keys:
            raise cur.fail(f"key {key} appears twice")
        keys.add(key)
        kind = cur.unpack("I", f"type of {key}")
        if key == "general.alignment":
            if kind != 4:
                raise cur.fail("general.alignment is not a uint32")
            alignment = cur.unpack("I", key)
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment {alignment} is not a power of two")
        else:
            cur.skip_value(kind, key)
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    if len({name for name, *_ in infos}) != len(infos):
        raise cur.fail("a tensor name appears twice")
    data_start = -(-cur.pos // alignment) * alignment
    return [_span(cur, info, data_start, alignment) for info in infos]


def _tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("tensor name")
    n_dims = cur.unpack("I", f"tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name} has {n_dims} dimensions")
    shape = tuple(cur.unpack("Q", f"tensor {name}") for _ in range(n_dims))
    return name, shape, cur.unpack("I", f"tensor {name}"), cur.unpack("Q", f"tensor {name}")


def _span(
    cur: _Cursor, info: tuple[str, tuple[int, ...], int, int], data_start: int, align: int
) -> TensorSpan:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name, shape, type_id, offset = info
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name} has unknown type {type_id}") from None
    count = 1
    for dim in shape:
        count *= dim
    if count == 0 or shape[0] % block:
        raise cur.fail(f"tensor {name} has an impossible shape {list(shape)}")
    if count > cur.size * block:  # more values than the whole file could hold: no need to multiply further
        raise cur.fail(f"tensor {name} ({count} values) runs past the end of the file")
    nbytes = count // block * type_size
    start = data_start + offset
    if offset % align:
        raise cur.fail(f"tensor {name}'s data offset {offset} is not aligned to {align} bytes")
    if start + nbytes > cur.size:
        raise cur.fail(
            f"tensor {name}'s data ({nbytes} bytes at offset {offset}) runs past the end of the file"
        )
    return TensorSpan(name, shape, type_id, start, nbytes)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """gguf-py's reader over ``path``, after :func:`check_layout` has accepted the file."""
    try:
        import gguf
    except ImportError:
        raise EdgeLoraError(
            "reading GGUF files needs gguf-py", hint="pip install 'edge-lora[gguf]'"
        ) from None
    check_layout(path)
    try:
        return gguf.GGUFReader(os.fspath(path))
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as err:
        raise EdgeLoraError(f"gguf-py cannot read the file ({err})", path=path, hint=_HINT) from None


def field_value(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    """A metadata value as Python (str, int, float, bool or a list of them), or ``default``."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as err:
        raise EdgeLoraError(f"metadata key {key} cannot be read ({err})", path=reader.data.filename) from None
