"""`edge-lora import-gguf`: a GGUF base back into a Hugging Face folder, checked against transformers'
own GGUF loader (logits) and llama.cpp (token ids), and refused whole on a hostile or truncated file.

The GGUFs are written by our exporter from tiny random models of each family (and one with rows of
256, so the k-quants quantize every matrix); llama.cpp's own reference vocabularies check the tokenizer
on the strings llama.cpp tests itself with.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf_import_helpers import gguf_maker, import_into
from llama_refs import models_dir, vocab_cases
from tiny_models import FAMILIES, make_model_dir

from converters.gguf_export import export_gguf
from converters.gguf_import import import_gguf
from converters.gguf_import_tokenizer import tokenizer_files
from edge_lora.app.cli import main
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
    return gguf_maker(model_dirs, tmp_path_factory.mktemp("gguf-import"))


# --- the round trip: exact weights, the same tokenizer, a folder export takes --------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_reproduces_the_weights(family, model_dirs, ggufs, tmp_path):
    original = ModelDir(model_dirs[family])
    imported = ModelDir(import_into(ggufs(family, "f32"), tmp_path))
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
    imported_dir = import_into(ggufs(family, "f32"), tmp_path)
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
    again = export_gguf(ModelDir(import_into(first, tmp_path)), tmp_path / "again.gguf", "f32")
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
    diff = _compare_with_transformers(path, import_into(path, tmp_path), family)
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
    diff = _compare_with_transformers(path, import_into(path, tmp_path), "smollm")
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
    ours = Tokenizer.from_file(str(import_into(path, tmp_path) / "tokenizer.json"))
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
    imported = import_into(path, tmp_path)
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


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ],
    ids=["llama-3.1", "llama-3.2"],
)
def test_llama3_rope_parameters_recovered_from_rope_freqs(scaling):
    """Llama 3.1/3.2's own parameters come back exactly from the float32 rope_freqs llama.cpp keeps."""
    from converters.gguf_import_config import llama3_scaling
    from edge_lora.config import ModelConfig
    from edge_lora.gguf_format.names import llama3_rope_factors

    config = ModelConfig(
        "LlamaForCausalLM",
        128256,
        4096,
        14336,
        32,
        32,
        8,
        128,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", **scaling},
    )
    divisors = llama3_rope_factors(config).astype(np.float64)
    assert llama3_scaling(divisors, 500000.0, 128, "rope_freqs") == {"rope_type": "llama3", **scaling}
