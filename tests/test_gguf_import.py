"""`edge-lora import-gguf`: a GGUF base back into a Hugging Face folder, checked against transformers'
own GGUF loader (logits) and llama.cpp (token ids), and refused whole on a hostile or truncated file.

The GGUFs are written by our exporter from tiny random models of each family (and one with rows of
256, so the k-quants quantize every matrix); llama.cpp's own reference vocabularies check the tokenizer
on the strings llama.cpp tests itself with.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_refs import models_dir, vocab_cases
from tiny_models import FAMILIES, make_model_dir

from converters.gguf_export import export_gguf
from converters.gguf_import import import_gguf
from converters.gguf_import_tokenizer import tokenizer_files
from edge_lora.app.cli import main
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.file_read import open_gguf
from edge_lora.model_dir import ModelDir

QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_1")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE id = 42;",
    "  leading spaces, trailing spaces  ",
    "digits 1234567890 and 3.14159, year 2026",
    "Grüße aus Köln! 東京 に 行きます 🙂 ½",
    "tabs\tand\nnew lines\n\n  indented",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "",
    " ",
    "edge-lora's adapters run on the device",
]
IDS = [0, 5, 17, 42, 99, 150, 200, 7, 3, 250, 11, 64]  # inside every tiny vocabulary


@pytest.fixture(scope="module")
def ggufs(model_dirs, tmp_path_factory):
    """(family, quant) -> a GGUF written by our exporter, made on first use."""
    root = tmp_path_factory.mktemp("gguf-import")
    made = {}

    def get(family: str, quant: str):
        if (family, quant) not in made:
            folder = root / f"{family}-{quant}"
            folder.mkdir()
            made[family, quant] = export_gguf(ModelDir(model_dirs[family]), folder / f"{family}.gguf", quant)
        return made[family, quant]

    return get


def _imported(path, tmp_path):
    return import_gguf(path, tmp_path / f"imported-{path.stem}")


# --- the round trip: exact weights, the same tokenizer, a folder export takes --------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_reproduces_the_weights(family, model_dirs, ggufs, tmp_path):
    original = ModelDir(model_dirs[family])
    imported = ModelDir(_imported(ggufs(family, "f32"), tmp_path))
    assert imported.tensor_names() == original.tensor_names()
    for name in original.tensor_names():
        assert np.array_equal(imported.get(name), original.get(name)), name
    want, got = original.config, imported.config
    for field in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert getattr(got, field) == getattr(want, field), field
    assert got.architecture == want.architecture
    np.testing.assert_allclose(got.rope_inv_freq(), want.rope_inv_freq(), rtol=1e-6)
    assert np.float32(got.rms_norm_eps) == np.float32(want.rms_norm_eps)


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_tokenizer_gives_the_original_ids(family, model_dirs, ggufs, tmp_path):
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(model_dirs[family] / "tokenizer.json"))
    imported_dir = _imported(ggufs(family, "f32"), tmp_path)
    imported = Tokenizer.from_file(str(imported_dir / "tokenizer.json"))
    for text in TEXTS:
        assert imported.encode(text).ids == original.encode(text).ids, text
        assert imported.decode(imported.encode(text).ids, skip_special_tokens=False) == text
    config = json.loads((imported_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["add_bos_token"] is False


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_export_takes_the_imported_folder_as_it_is(family, ggufs, tmp_path):
    """Export the imported folder again: the same tensors, bit for bit, as the GGUF it came from."""
    import gguf

    first = ggufs(family, "f32")
    again = export_gguf(ModelDir(_imported(first, tmp_path)), tmp_path / "again.gguf", "f32")
    a, b = gguf.GGUFReader(first), gguf.GGUFReader(again)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors):
        assert np.array_equal(x.data, y.data), x.name
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
        assert a.fields[key].contents() == b.fields[key].contents(), key


def test_dtypes_and_progress(ggufs, tmp_path):
    """f16 and bf16 folders hold every tensor in that dtype, each the f32 import rounded to it (bf16: to
    nearest even, as torch rounds)."""
    import torch
    from safetensors.torch import load_file

    lines = []
    for dtype in ("f32", "f16", "bf16"):
        import_gguf(ggufs("llama", "q8_0"), tmp_path / dtype, dtype=dtype, progress=lines.append)
    full = load_file(tmp_path / "f32" / "model.safetensors")
    for dtype, torch_dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        narrow = load_file(tmp_path / dtype / "model.safetensors")
        assert narrow.keys() == full.keys()
        for name, tensor in full.items():
            assert narrow[name].dtype == torch_dtype and torch.equal(narrow[name], tensor.to(torch_dtype)), (
                name
            )
    assert any("tensor 1/" in line for line in lines) and any("wrote" in line for line in lines)


# --- logits: our folder through transformers = transformers' own GGUF loading --------------------


def _hf_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def _compare_with_transformers(gguf_path, imported_dir, family: str) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {}
    if family == "llama3":  # transformers' GGUF loader drops rope_freqs (llama3 rope scaling): give it ours
        kwargs["config"] = AutoConfig.from_pretrained(imported_dir)
    if family == "mistral":
        # transformers 5 with gguf 0.19 cannot map the tensors of a GGUF it calls Mistral ("Unknown gguf
        # model_type: mistral in gguf-py"): load the same file as the Llama it is to llama.cpp (Mistral
        # without a sliding window, as we import it, computes the same)
        raw = json.loads((imported_dir / "config.json").read_text())
        for key in ("model_type", "architectures", "sliding_window"):
            raw.pop(key)
        kwargs["config"] = AutoConfig.for_model("llama", **raw)
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
    ).eval()
    ours = AutoModelForCausalLM.from_pretrained(imported_dir, dtype=torch.float32).eval()
    assert family == "mistral" or type(ours) is type(reference)
    return float(np.abs(_hf_logits(ours) - _hf_logits(reference)).max())


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_gguf_loading(family, quant, ggufs, tmp_path, record_property):
    path = ggufs(family, quant)
    diff = _compare_with_transformers(path, _imported(path, tmp_path), family)
    print(f"{family} {quant}: max |logit difference| vs transformers' GGUF load = {diff:.3g}")
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5


@pytest.mark.slow
def test_k_quant_with_rows_of_256(tmp_path, record_property):
    """q4_k_m through llama.cpp's quantizer on a model whose rows fill whole super-blocks: every matrix
    is a k-quant (none falls back), and the import equals transformers' loading of the same file."""
    import gguf

    model = make_model_dir(tmp_path / "wide", "smollm", hidden_size=256, intermediate_size=256)
    path = export_gguf(ModelDir(model), tmp_path / "wide-q4_k_m.gguf", "q4_k_m")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    matrices = [n for n in kinds if n.startswith("blk.") and "norm" not in n]
    assert {kinds[n] for n in matrices} <= {"Q4_K", "Q6_K"}
    assert "Q4_K" in kinds.values()
    diff = _compare_with_transformers(path, _imported(path, tmp_path), "smollm")
    print(f"smollm q4_k_m (rows of 256): max |logit difference| = {diff:.3g}")
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5


# --- tokenizers: transformers' GGUF tokenizer and llama.cpp on the same file ----------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "smollm"])
def test_tokenizer_equals_transformers_and_llama_cpp(family, ggufs, tmp_path):
    import llama_cpp
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = ggufs(family, "q8_0")
    ours = Tokenizer.from_file(str(_imported(path, tmp_path) / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ids == vocab.tokenize(text.encode(), add_bos=False, special=True), text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2", "starcoder"])
def test_reference_vocabularies_give_llama_cpps_ids(name, record_property):
    """llama.cpp's own tokenizer tests: each ggml-vocab-<name>.gguf imported by us must give llama.cpp's
    expected ids on every one of its test strings (no special tokens, no BOS)."""
    from tokenizers import Tokenizer

    path = models_dir() / f"ggml-vocab-{name}.gguf"
    reader = open_gguf(path)
    files = tokenizer_files(reader, path, 4096)
    tok = Tokenizer.from_str(files["tokenizer.json"])
    cases = vocab_cases(name)
    wrong = [(text, ref) for text, ref in cases if tok.encode(text, add_special_tokens=False).ids != ref]
    print(f"{name}: {len(cases) - len(wrong)}/{len(cases)} strings equal to llama.cpp's reference ids")
    record_property("strings", len(cases))
    assert not wrong, f"{name}: {wrong[0][0]!r} tokenizes differently from llama.cpp's reference"


# --- hostile and unsupported files: one line, no folder --------------------------------------------


def _offsets(path):
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
        "arch": _value_at(reader, "general.architecture"),
        "tokenizer": _value_at(reader, "tokenizer.ggml.model"),
        "blocks": _value_at(reader, "llama.block_count") - 8,  # a uint32: no length before it
        "merge": _item_at(reader, "tokenizer.ggml.merges"),
    }


def _item_at(reader, key):
    """Where the first item of an array of strings lies in the file (its text, after its length)."""
    field = reader.fields[key]
    return field.parts[field.data[0]].ctypes.data - reader.data.ctypes.data


def _value_at(reader, key):
    field = reader.fields[key]
    return field.offset + 8 + len(key) + 4 + 8  # the string's bytes


def _patch(data: bytearray, at: int, raw: bytes) -> bytearray:
    data[at : at + len(raw)] = raw
    return data


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
    yield "bad magic", bytes(_patch(bytearray(raw), 0, b"GGUX"))
    yield "version 99", bytes(_patch(bytearray(raw), 4, struct.pack("<I", 99)))
    yield "big-endian", bytes(_patch(bytearray(raw), 4, struct.pack(">I", 3)))
    yield "absurd tensor count", bytes(_patch(bytearray(raw), 8, struct.pack("<Q", 2**62)))
    yield "absurd key count", bytes(_patch(bytearray(raw), 16, struct.pack("<Q", 2**62)))
    yield "absurd array length", bytes(_patch(bytearray(raw), where["count"], struct.pack("<Q", 2**61)))
    yield "9 dimensions", bytes(_patch(bytearray(raw), where["ndims"], struct.pack("<I", 9)))
    yield "unknown tensor type", bytes(_patch(bytearray(raw), where["type"], struct.pack("<I", 99)))
    yield "unsupported tensor type", bytes(_patch(bytearray(raw), where["type"], struct.pack("<I", 20)))
    yield "data out of the file", bytes(_patch(bytearray(raw), where["offset"], struct.pack("<Q", 2**40)))
    yield "unaligned data", bytes(_patch(bytearray(raw), where["offset"], struct.pack("<Q", 3)))
    yield "NaN weights", bytes(_patch(bytearray(raw), where["data"], struct.pack("<f", float("nan")) * 4))
    yield "unknown architecture", bytes(_patch(bytearray(raw), where["arch"], b"mamba"))
    yield "unknown tokenizer", bytes(_patch(bytearray(raw), where["tokenizer"], b"bert"))
    yield "merge of no tokens", bytes(_patch(bytearray(raw), where["merge"], b"\x01"))
    yield "absurd block count", bytes(_patch(bytearray(raw), where["blocks"], struct.pack("<I", 2**31)))


def test_hostile_files_give_one_line_and_no_folder(ggufs, tmp_path, capsys):
    source = ggufs("smollm", "f32")
    raw = source.read_bytes()
    where = _offsets(source)
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


def test_cli_import_and_force(ggufs, tmp_path, capsys):
    source = ggufs("qwen2", "q4_0")
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["import-gguf", str(source), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["import-gguf", str(source), "--out", str(out), "--force"]) == 0
    captured = capsys.readouterr()
    assert "wrote model folder" in captured.out and "tensor 1/" in captured.err
    assert not (out / "keep.txt").exists() and ModelDir(out).config.model_type == "qwen2"
    assert main(["inspect", str(out)]) == 0


def test_a_file_cut_anywhere_is_refused_whole(ggufs, tmp_path):
    """Cut at every 53rd byte of the header and every 40 KB of the data: one line and no folder, unless the
    cut removed only padding after the last tensor's data."""
    import gguf

    source = ggufs("llama", "q4_0")
    raw = source.read_bytes()
    data_start = _offsets(source)["data"]
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


@pytest.mark.slow
def test_sentencepiece_model_round_trip(tmp_path):
    """A Llama 2 style model (SentencePiece BPE with byte fallback, BOS added): its tokenizer from llama.cpp's
    ggml-vocab-llama-spm, exported by us, imported back. Logits equal transformers' GGUF loading; ids
    (BOS included) equal llama.cpp's, and transformers' GGUF tokenizer's but where the text starts with a
    space (its Metaspace "first" adds no "▁" there, llama.cpp and SentencePiece do)."""
    import llama_cpp
    from tiny_models import make_model_dir_with_tokenizer
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(models_dir()), gguf_file="ggml-vocab-llama-spm.gguf").save_pretrained(
        tmp_path / "tok"
    )
    model = make_model_dir_with_tokenizer(tmp_path / "spm", "llama", tmp_path / "tok")
    path = export_gguf(ModelDir(model), tmp_path / "spm.gguf", "q8_0")
    imported = _imported(path, tmp_path)
    assert _compare_with_transformers(path, imported, "llama") <= 1e-5
    ours = Tokenizer.from_file(str(imported / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    texts = [t for t in TEXTS if t] + [text for text, _ in vocab_cases("llama-spm") if text]
    for text in texts:
        ids = ours.encode(text).ids
        assert ids[0] == vocab.token_bos()
        assert ids == vocab.tokenize(text.encode(), add_bos=True, special=True), text
        if not text.startswith(" "):
            assert ids == theirs.encode(text), text
        assert ours.decode(ids, skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def small_gguf(ggufs):
    """The smallest of the tiny GGUFs (q4_0 smollm) and where its tensor data starts."""
    path = ggufs("smollm", "q4_0")
    return path.read_bytes(), _offsets(path)["data"]


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
    bad.write_bytes(bytes(_patch(bytearray(source.read_bytes()), at, struct.pack("<Q", 2**40))))
    capsys.readouterr()
    assert main(["inspect", str(bad)]) == 2
    assert "token_type" in capsys.readouterr().err
    assert main(["inspect", str(source)]) == 0
