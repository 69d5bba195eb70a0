"""What the import-gguf tests share: our exporter's GGUFs of the tiny families, made once per module, and
the byte offsets of a GGUF's fields for the hostile-file tests."""

from __future__ import annotations

from converters.gguf_export import export_gguf
from converters.gguf_import import import_gguf
from edge_lora.model_dir import ModelDir


def gguf_maker(model_dirs, root):
    """``get(family, quant)``: a GGUF of that tiny model written by our exporter under ``root``, made on
    first use (each test module's ``ggufs`` fixture holds one)."""
    made = {}

    def get(family: str, quant: str):
        if (family, quant) not in made:
            folder = root / f"{family}-{quant}"
            folder.mkdir()
            made[family, quant] = export_gguf(ModelDir(model_dirs[family]), folder / f"{family}.gguf", quant)
        return made[family, quant]

    return get


def import_into(path, tmp_path):
    """``path`` imported into a folder under ``tmp_path`` named after it."""
    return import_gguf(path, tmp_path / f"imported-{path.stem}")


def offsets(path):
    """Byte offsets to patch: (start of the tokens array count, first tensor's info, data start)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    count_at = tokens.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    info = reader.tensors[0].field
    name_len = len(reader.tensors[0].name)
    n_dims = len(reader.tensors[0].shape)
    type_at = info.offset + 8 + name_len + 4 + 8 * n_dims
    return {
        "count": count_at,
        "ndims": info.offset + 8 + name_len,
        "type": type_at,
        "offset": type_at + 4,
        "data": reader.data_offset,
        "arch": value_at(reader, "general.architecture"),
        "tokenizer": value_at(reader, "tokenizer.ggml.model"),
        "blocks": value_at(reader, "llama.block_count") - 8,  # a uint32: no length before it
        "merge": item_at(reader, "tokenizer.ggml.merges"),
    }


def item_at(reader, key):
    """Where the first item of an array of strings lies in the file (its text, after its length)."""
    field = reader.fields[key]
    return field.parts[field.data[0]].ctypes.data - reader.data.ctypes.data


def value_at(reader, key):
    field = reader.fields[key]
    return field.offset + 8 + len(key) + 4 + 8  # the string's bytes


def patch(data: bytearray, at: int, raw: bytes) -> bytearray:
    data[at : at + len(raw)] = raw
    return data
