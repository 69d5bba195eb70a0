"""`edge-lora import-gguf` and `inspect` on hostile, truncated and unsupported GGUF files: one line naming
the file (exit 2 from the CLI), and no output folder, whatever the bytes."""

from __future__ import annotations

import shutil
import struct

import pytest
from gguf_import_helpers import gguf_maker, offsets, patch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.gguf_import import import_gguf
from edge_lora.app.cli import main
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir


@pytest.fixture(scope="module")
def ggufs(model_dirs, tmp_path_factory):
    """(family, quant) -> a GGUF written by our exporter, made on first use."""
    return gguf_maker(model_dirs, tmp_path_factory.mktemp("gguf-import"))


def _hostile_cases(raw: bytes, where: dict):
    size = len(raw)
    cuts = sorted(
        {
            0,
            3,
            4,
            8,
            16,
            23,
            24,
            40,
            where["count"] + 4,
            where["ndims"],
            where["data"] - 1,
            where["data"] + 1,
            size // 2,
            size - 1,
        }
    )
    for cut in cuts:
        yield f"cut at {cut}", raw[:cut]
    yield "bad magic", bytes(patch(bytearray(raw), 0, b"GGUX"))
    yield "version 99", bytes(patch(bytearray(raw), 4, struct.pack("<I", 99)))
    yield "big-endian", bytes(patch(bytearray(raw), 4, struct.pack(">I", 3)))
    yield "absurd tensor count", bytes(patch(bytearray(raw), 8, struct.pack("<Q", 2**62)))
    yield "absurd key count", bytes(patch(bytearray(raw), 16, struct.pack("<Q", 2**62)))
    yield "absurd array length", bytes(patch(bytearray(raw), where["count"], struct.pack("<Q", 2**61)))
    yield "9 dimensions", bytes(patch(bytearray(raw), where["ndims"], struct.pack("<I", 9)))
    yield "unknown tensor type", bytes(patch(bytearray(raw), where["type"], struct.pack("<I", 99)))
    yield "unsupported tensor type", bytes(patch(bytearray(raw), where["type"], struct.pack("<I", 20)))
    yield "data out of the file", bytes(patch(bytearray(raw), where["offset"], struct.pack("<Q", 2**40)))
    yield "unaligned data", bytes(patch(bytearray(raw), where["offset"], struct.pack("<Q", 3)))
    yield "NaN weights", bytes(patch(bytearray(raw), where["data"], struct.pack("<f", float("nan")) * 4))
    yield "unknown architecture", bytes(patch(bytearray(raw), where["arch"], b"mamba"))
    yield "unknown tokenizer", bytes(patch(bytearray(raw), where["tokenizer"], b"bert"))
    yield "merge of no tokens", bytes(patch(bytearray(raw), where["merge"], b"\x01"))
    yield "absurd block count", bytes(patch(bytearray(raw), where["blocks"], struct.pack("<I", 2**31)))


def test_hostile_files_give_one_line_and_no_folder(ggufs, tmp_path, capsys):
    source = ggufs("smollm", "f32")
    raw = source.read_bytes()
    where = offsets(source)
    assert raw[where["arch"] : where["arch"] + 5] == b"llama"
    assert raw[where["tokenizer"] : where["tokenizer"] + 4] == b"gpt2"
    for i, (what, data) in enumerate(_hostile_cases(raw, where)):
        bad = tmp_path / f"bad{i}.gguf"
        bad.write_bytes(data)
        out = tmp_path / f"out{i}"
        with pytest.raises(EdgeLoraError) as err:
            import_gguf(bad, out)
        assert str(bad) in str(err.value) and "\n" not in str(err.value), what
        assert not out.exists(), what
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{i}")] == [], what
        capsys.readouterr()
        assert main(["import-gguf", str(bad), "--out", str(out), "--quiet"]) == 2, what
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and stderr.startswith("error: "), (what, stderr)
        assert not out.exists(), what


def test_a_file_cut_anywhere_is_refused_whole(ggufs, tmp_path):
    """Cut at every 53rd byte of the header and every 40 KB of the data: one line and no folder, unless the
    cut removed only padding after the last tensor's data."""
    import gguf

    source = ggufs("llama", "q4_0")
    raw = source.read_bytes()
    data_start = offsets(source)["data"]
    data_end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(source).tensors)
    cuts = [*range(1, data_start + 64, 53), *range(data_start, len(raw), 40_000), len(raw) - 1]
    bad, out = tmp_path / "cut.gguf", tmp_path / "out"
    for cut in cuts:
        bad.write_bytes(raw[:cut])
        try:
            import_gguf(bad, out)
        except EdgeLoraError as err:
            assert "\n" not in str(err) and str(bad) in str(err), cut
            assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir()), cut
        else:
            assert cut >= data_end, f"a file cut at byte {cut} of {len(raw)} was imported"
            shutil.rmtree(out)


@pytest.fixture(scope="module")
def small_gguf(ggufs):
    """The smallest of the tiny GGUFs (q4_0 smollm) and where its tensor data starts."""
    path = ggufs("smollm", "q4_0")
    return path.read_bytes(), offsets(path)["data"]


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_headers_import_or_give_one_line(small_gguf, tmp_path_factory, data):
    """Random bytes and 32/64-bit words written over the header (counts, lengths, types, offsets, texts):
    the import either succeeds or raises EdgeLoraError, and a refusal leaves no folder."""
    raw, data_start = small_gguf
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, data_start - 1))
        width = data.draw(st.sampled_from([1, 4, 8]))
        mutated[at : at + width] = data.draw(st.binary(min_size=width, max_size=width))
    root = tmp_path_factory.mktemp("mutated")
    bad, out = root / "m.gguf", root / "out"
    bad.write_bytes(bytes(mutated))
    try:
        import_gguf(bad, out)
    except EdgeLoraError as err:
        assert "\n" not in str(err)
        assert not out.exists()
    else:
        ModelDir(out).config  # noqa: B018 - an imported folder reads back
    shutil.rmtree(root)


def test_inspect_refuses_what_the_import_refuses(ggufs, tmp_path, capsys):
    """`edge-lora inspect` reads a GGUF through the same checked opening: an array count past the end of
    the file (on which gguf-py's reader alone loops for ever) gives the one line and exit 2."""
    import gguf

    source = ggufs("smollm", "f32")
    field = gguf.GGUFReader(source).fields["tokenizer.ggml.token_type"]
    at = field.offset + 8 + len("tokenizer.ggml.token_type") + 4 + 4
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(patch(bytearray(source.read_bytes()), at, struct.pack("<Q", 2**40))))
    capsys.readouterr()
    assert main(["inspect", str(bad)]) == 2
    assert "token_type" in capsys.readouterr().err
    assert main(["inspect", str(source)]) == 0
