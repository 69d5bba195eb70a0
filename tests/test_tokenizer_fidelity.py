"""Tokenizer fidelity on llama.cpp's own test strings, for every tokenizer style a supported family uses.

For each llama.cpp reference vocabulary (``ggml-vocab-<name>.gguf`` with its ``.inp`` strings and
``.out`` ids): turn it into the tokenizer.json a user's model directory would hold (transformers'
GGUF reader, then ``save_pretrained``), put it on a tiny random model of the matching family, export
a bundle (GGUF and ONNX), and check on every string that
(a) llama.cpp tokenizing our GGUF gives llama.cpp's reference ids wherever the Hugging Face tokenizer
    itself gives them (strings where HF disagrees with the reference are counted and printed);
(b) our runtime's tokenizer gives the Hugging Face ids;
(c) onnxruntime-genai's tokenizer on our ONNX folder gives the Hugging Face ids, but for the known,
    named differences of that tokenizer below, each counted and printed.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest
from llama_refs import models_dir, vocab_cases
from tiny_models import make_model_dir_with_tokenizer

from converters.export import ExportOptions, export_bundle
from converters.gguf_export import export_gguf
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from runtime.llamacpp.lib import tokenize_with_gguf
from runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

# llama.cpp reference vocabulary -> the family whose models ship that tokenizer style
VOCABS = {
    "llama-spm": "llama",  # Llama 2 / Mistral / TinyLlama: SentencePiece BPE, byte fallback, Metaspace
    "phi-3": "llama",  # SentencePiece BPE with the legacy Prepend + Replace normalizer (TinyLlama's shape)
    "llama-bpe": "llama3",  # Llama 3: byte-level BPE, its own split regex, ignore_merges
    "qwen2": "qwen2",  # Qwen2: byte-level BPE, single-digit split regex, NFC
    "gpt-2": "smollm",  # plain GPT-2 byte-level BPE
    # SmolLM's style: Digits + ByteLevel; llama.cpp's "smollm" pre-tokenizer = StarCoder's regex
    "starcoder": "smollm",
}


def _starts_with_space(text: str) -> bool:
    return text.startswith(" ")


def _has_other_number(text: str) -> bool:
    return any(unicodedata.category(c) == "No" for c in text)


# Where onnxruntime-genai's tokenizer (onnxruntime-extensions) differs from Hugging Face's on the same
# tokenizer.json, for a reason outside our files: vocabulary -> (which strings, why).
GENAI_KNOWN_DIFFERENCES = {
    "llama-spm": (
        _starts_with_space,
        'ORT GenAI puts "\u2581" before text that already starts with a space, as '
        'SentencePiece does; Metaspace(prepend_scheme="first") does not',
    ),
    "starcoder": (
        _has_other_number,
        "ORT GenAI's Digits step isolates decimal digits only; Hugging Face also "
        "isolates other numbers such as \u00bd",
    ),
}


@dataclass
class Built:
    name: str
    cases: list[tuple[str, list[int]]]  # (text, llama.cpp's reference ids)
    hf_ids: list[list[int]]
    model_dir: Path
    bundle: Path

    @property
    def texts(self) -> list[str]:
        return [text for text, _ in self.cases]

    def gguf(self) -> Path:
        return self.bundle / Bundle.open(self.bundle).backends["gguf"][0]["model"]

    def onnx_dir(self) -> Path:
        return (self.bundle / Bundle.open(self.bundle).backends["onnx"][0]["model"]).parent


def _shipped_tokenizer(name: str, out: Path) -> Path:
    """The tokenizer.json (and config) a model of this style ships, made from llama.cpp's vocabulary."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(models_dir()), gguf_file=f"ggml-vocab-{name}.gguf").save_pretrained(out)
    path = out / "tokenizer.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    # transformers' GGUF reader keeps the vocabulary and merges but not every pipeline step these models ship:
    if name == "llama-bpe":  # Llama 3's tokenizer.json takes a whole word that is in the vocabulary as it is
        raw["model"]["ignore_merges"] = True
    if name == "qwen2":  # Qwen2's tokenizer.json normalizes to NFC
        raw["normalizer"] = {"type": "NFC"}
    if name == "starcoder":  # SmolLM's and StarCoder's: every digit on its own, then byte-level BPE
        raw["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        }
        # transformers 5's GPT2Tokenizer class rebuilds a plain ByteLevel pre-tokenizer and would ignore the
        # Digits step; the generic class runs tokenizer.json as written, as transformers 4 did for SmolLM
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """name -> Built, made once per vocabulary for the whole module."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizer-fidelity")
    done: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in done:
            tokenizer_dir = _shipped_tokenizer(name, root / f"{name}-tokenizer")
            model_dir = make_model_dir_with_tokenizer(root / f"{name}-model", VOCABS[name], tokenizer_dir)
            bundle = export_bundle(
                model_dir,
                root / f"{name}-bundle",
                [],
                ExportOptions(backends=["onnx", "gguf"], onnx_quants=["fp32"], gguf_quants=["f16"]),
                show_progress=False,
            )
            hf = AutoTokenizer.from_pretrained(model_dir)
            cases = vocab_cases(name)
            done[name] = Built(
                name,
                cases,
                [hf.encode(text, add_special_tokens=False) for text, _ in cases],
                model_dir,
                bundle,
            )
        return done[name]

    return get


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_on_our_gguf_gives_the_reference_ids(build, name, record_property):
    built = build(name)
    ours = tokenize_with_gguf(built.gguf(), built.texts, add_special=False, parse_special=False)
    compared = [
        (text, ref, got) for (text, ref), hf, got in zip(built.cases, built.hf_ids, ours) if hf == ref
    ]
    hf_differs = [text for (text, ref), hf in zip(built.cases, built.hf_ids) if hf != ref]
    agreed = sum(got == ref for _, ref, got in compared)
    print(
        f"{name}: GGUF via llama.cpp {agreed}/{len(compared)} strings equal to the reference; "
        f"HF itself differs from the reference on {len(hf_differs)}: {[t[:20] for t in hf_differs]}"
    )
    record_property("gguf_compared", len(compared))
    record_property("hf_differs_from_reference", len(hf_differs))
    assert len(compared) >= len(built.cases) // 2, (
        f"{name}: HF agrees with llama.cpp's reference on too few strings"
    )
    for text, ref, got in compared:
        assert got == ref, (
            f"{name}: llama.cpp on our GGUF tokenizes {text!r} as {got}, the reference as {ref}"
        )


@pytest.mark.parametrize("name", VOCABS)
def test_runtime_tokenizer_gives_the_hf_ids(build, name, record_property):
    built = build(name)
    tokenizer = Tokenizer(built.bundle / Bundle.open(built.bundle).tokenizer["tokenizer"])
    ours = [tokenizer.encode(text, add_special_tokens=False) for text in built.texts]
    print(
        f"{name}: runtime tokenizer {sum(a == b for a, b in zip(ours, built.hf_ids))}/{len(ours)} strings "
        "equal to HF"
    )
    record_property("runtime_compared", len(ours))
    for text, got, want in zip(built.texts, ours, built.hf_ids):
        assert got == want, f"{name}: the runtime tokenizes {text!r} as {got}, Hugging Face as {want}"


@pytest.mark.parametrize("name", VOCABS)
def test_genai_tokenizer_on_our_onnx_gives_the_hf_ids(build, name, record_property):
    import onnxruntime_genai as og

    built = build(name)
    tokenizer = og.Tokenizer(og.Model(str(built.onnx_dir())))
    ours = [[int(i) for i in tokenizer.encode(text)] for text in built.texts]
    known, why = GENAI_KNOWN_DIFFERENCES.get(name, (lambda _text: False, ""))
    differing = [(text, got, want) for text, got, want in zip(built.texts, ours, built.hf_ids) if got != want]
    explained = [text for text, _, _ in differing if known(text)]
    print(
        f"{name}: ORT GenAI tokenizer {len(ours) - len(differing)}/{len(ours)} strings equal to HF; "
        f"{len(explained)} known differences ({why or 'none'})"
    )
    record_property("genai_compared", len(ours))
    record_property("genai_known_differences", len(explained))
    for text, got, want in differing:
        assert known(text), f"{name}: ORT GenAI tokenizes {text!r} as {got}, Hugging Face as {want}"


# --- styles llama.cpp cannot follow are refused at export -----------------------------------------


def _metaspace_split(raw):  # SentencePiece never splits at spaces; llama.cpp neither
    raw["pre_tokenizer"]["split"] = True


def _lowercasing(raw):  # llama.cpp does not normalize text
    raw["normalizer"] = {"type": "Lowercase"}


def _ignore_merges_on_gpt2(raw):  # llama.cpp's gpt-2 pre-tokenizer always applies the merges
    raw["model"]["ignore_merges"] = True


def _unigram(raw):
    raw["model"]["type"] = "Unigram"


@pytest.mark.parametrize(
    "name,change,words",
    [
        ("llama-spm", _metaspace_split, ["SentencePiece-style", "Metaspace(split=True"]),
        ("llama-spm", _lowercasing, ["SentencePiece-style", "Lowercase"]),
        ("gpt-2", _lowercasing, ["byte-level", "Lowercase"]),
        ("gpt-2", _ignore_merges_on_gpt2, ["ignore_merges=True", "'gpt-2'"]),
        ("gpt-2", _unigram, ["Unigram"]),
    ],
)
def test_unmappable_styles_are_refused_in_one_line(build, tmp_path, name, change, words):
    model_dir = tmp_path / "model"
    shutil.copytree(build(name).model_dir, model_dir)
    path = model_dir / "tokenizer.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    change(raw)
    path.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(EdgeLoraError) as err:
        export_gguf(ModelDir(model_dir), tmp_path / "out.gguf", "f16")
    message = str(err.value)
    print(message)
    assert "\n" not in message and str(path) in message
    assert all(w in message for w in words), message
    assert not (tmp_path / "out.gguf").exists()
