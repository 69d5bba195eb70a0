"""Writing a filled ``gguf.GGUFWriter`` to disk: atomically, or in place for a private scratch file.

Every GGUF we make (base export, merge, adapter) goes through :func:`write_gguf`. gguf-py writes the
tensors from the arrays it was handed (``ndarray.tofile``), so nothing here copies them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.atomic import atomic_path
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from gguf import GGUFWriter


def write_gguf(writer: GGUFWriter, path: str | os.PathLike, what: str, durable: bool = True) -> Path:
    """Write ``writer``'s header, metadata and tensors to ``path``; a full disk becomes a clear error.

    ``durable``: through a temporary file that is fsynced and renamed into place (a crash leaves the
    old file or the new one). ``durable=False``: straight into ``path``, overwritten in place and cut
    to length, no fsync: for a private scratch file that no crash needs to survive and that is
    rewritten often (the runtime's adapter conversion; rewriting cached pages cost a third of what
    a truncated file's fresh pages did). The writer is created with no path (``GGUFWriter(None, arch)``).
    """
    path = Path(path)
    if not durable:
        _write(writer, path, what, in_place=True)
        return path
    with atomic_path(path) as tmp:
        _write(writer, tmp, what, shown_path=path)
    return path


def _write(
    writer: GGUFWriter, path: Path, what: str, in_place: bool = False, shown_path: Path | None = None
) -> None:
    try:
        try:
            if in_place:
                _open_without_truncating(writer, path)
            writer.write_header_to_file(path)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            if in_place:
                writer.fout[0].truncate()  # a longer previous file leaves no tail
        finally:
            writer.close()  # flushes its buffer: a full disk may show only here
    except OSError as err:
        raise EdgeLoraError(
            f"cannot write the {what} ({err.strerror})", path=shown_path or path, hint="check free disk space"
        ) from None


def _open_without_truncating(writer: GGUFWriter, path: Path) -> None:
    """Hand ``writer`` its output file opened without O_TRUNC (``GGUFWriter.open_output_file`` always
    truncates). ``write_header_to_file(path)`` then takes the documented "already open, same path"
    branch of ``open_output_file`` and writes into this file."""
    from gguf.gguf_writer import WriterState

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    writer.path = path
    writer.fout = [open(fd, "wb")]  # an fd opened "wb" is not truncated again
    writer.state = WriterState.EMPTY
