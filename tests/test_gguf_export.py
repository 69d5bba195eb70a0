"""GGUF base export: llama.cpp loads it, tokenizes like us, and computes our PyTorch model's logits."""

import numpy as np
import pytest
import torch
from factories import build_bundle
from tiny_models import make_model_dir

from converters.gguf_export import export_gguf
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.train.model import CausalLM

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "Grüße aus Köln! 東京 に 行きます 🙂",
    "<|im_start|>user\nSELECT name FROM users WHERE id = 42;<|im_end|>",
    "numbers 1234567 and 3.14159, symbols #@$%^&*()",
    "def add(a, b):\n    return a + b\n",
    "ünïcödé ç ß ø Ω ж 中文 한국어 😀👍🏽",
    "a",
]


def _llama():
    import runtime.llamacpp.lib as lib

    lib.silence_log(False)
    return lib.llama_cpp()


def _reference_logits(model_dir, ids):
    model = CausalLM.from_model_dir(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


@pytest.fixture(scope="module")
def f32_bundles(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-base")
    return {f: build_bundle(d, root / f, backends=("gguf",)) for f, d in model_dirs.items()}


def test_tokenizer_ids_equal_ours(f32_bundles, model_dirs):
    from tokenizers import Tokenizer

    llama_cpp = _llama()
    for family in ("llama", "qwen2"):
        ours = Tokenizer.from_file(str(model_dirs[family] / "tokenizer.json"))
        llm = llama_cpp.Llama(
            model_path=str(f32_bundles[family] / "gguf/model-f32.gguf"), vocab_only=True, verbose=False
        )
        for text in TEXTS:
            theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            assert theirs == ours.encode(text).ids, text
            assert llm.detokenize(theirs, special=True).decode("utf-8") == text


def test_base_logits_match_pytorch(f32_bundles, model_dirs, family):
    import runtime

    engine = runtime.load(f32_bundles[family], backend="llamacpp")
    # Mistral's sliding window is 16: llama.cpp attends fully, so compare within the window there
    n = 16 if family == "mistral" else 48
    ids = [int(i) for i in np.random.default_rng(3).integers(0, engine.config.vocab_size, n)]
    diff = np.abs(engine.logits(ids) - _reference_logits(model_dirs[family], ids)).max()
    print(f"{family}: f32 GGUF vs PyTorch max |logit diff| = {diff:.2e}")
    assert diff < 1e-2


# min_top1: just under the worst top-1 agreement measured over 10 prompts (seeds 0-9, 48 tokens, where
# one flipped token is 0.979): every prompt agreed fully down to q5_0; q4_0 / q4_1 flipped one token
# in one prompt of the ten.
@pytest.mark.parametrize(
    "quant,max_diff,min_top1",
    [
        ("f16", 0.05, 0.99),
        ("bf16", 0.2, 0.99),
        ("q8_0", 0.1, 0.99),
        ("q5_1", 0.5, 0.99),
        ("q5_0", 0.5, 0.99),
        ("q4_1", 1.0, 0.97),
        ("q4_0", 1.0, 0.97),
    ],
)
def test_quantized_agreement(model_dirs, tmp_path, quant, max_diff, min_top1):
    import runtime

    bundle = build_bundle(model_dirs["smollm"], tmp_path / "b", backends=("gguf",), gguf_quants=(quant,))
    engine = runtime.load(bundle, backend="llamacpp")
    ids = [int(i) for i in np.random.default_rng(4).integers(0, engine.config.vocab_size, 48)]
    ours, ref = engine.logits(ids), _reference_logits(model_dirs["smollm"], ids)
    diff = np.abs(ours - ref).max()
    top1 = float((ours.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{quant}: max |logit diff| = {diff:.3f}, top-1 agreement = {top1:.3f} (range {np.ptp(ref):.2f})")
    assert top1 >= min_top1, f"{quant}: top-1 agreement {top1:.3f} < {min_top1}"
    assert diff < max_diff, f"{quant}: max |logit diff| {diff:.3f} >= {max_diff}"


def test_k_quants_through_llama_cpp(tmp_path):
    import gguf

    import runtime

    # rows of 256 fill K-quant super-blocks; the 96-wide down_proj exercises llama.cpp's per-tensor fallback
    md_path = make_model_dir(
        tmp_path / "wide", "smollm", hidden_size=256, intermediate_size=96, num_attention_heads=4
    )
    bundle = build_bundle(md_path, tmp_path / "b", backends=("gguf",), gguf_quants=("q4_k_m", "q6_k"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(bundle / "gguf/model-q4_k_m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    assert not types["blk.0.ffn_down.weight"].endswith("_K")  # 96 is no multiple of 256: fallback
    ids = [int(i) for i in np.random.default_rng(5).integers(0, 300, 32)]
    ref = _reference_logits(md_path, ids)
    # just under the worst top-1 agreement measured over 10 prompts (seeds 0-9, 32 tokens): q4_k_m 0.875,
    # q6_k 0.938
    for quant, min_top1 in (("q4_k_m", 0.87), ("q6_k", 0.93)):
        ours = runtime.load(bundle, backend="llamacpp", quant=quant).logits(ids)
        diff, top1 = np.abs(ours - ref).max(), float((ours.argmax(-1) == ref.argmax(-1)).mean())
        print(f"{quant}: max |logit diff| = {diff:.3f}, top-1 agreement = {top1:.3f}")
        assert top1 >= min_top1, f"{quant}: top-1 agreement {top1:.3f} < {min_top1}"


def test_metadata_keys(f32_bundles):
    import gguf

    reader = gguf.GGUFReader(f32_bundles["qwen2"] / "gguf/model-f32.gguf")
    fields = reader.fields
    assert fields["general.architecture"].contents() == "qwen2"
    assert (
        fields["tokenizer.ggml.model"].contents() == "gpt2"
        and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    )
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.bias" in names and "output.weight" not in names  # biased, tied
    llama3 = gguf.GGUFReader(f32_bundles["llama3"] / "gguf/model-f32.gguf")
    assert "rope_freqs.weight" in {t.name for t in llama3.tensors}


def test_unknown_quant_and_pre_tokenizer_are_clear_errors(model_dirs, tmp_path):
    import json
    import shutil

    with pytest.raises(EdgeLoraError, match="q4_0"):
        export_gguf(ModelDir(model_dirs["llama"]), tmp_path / "x.gguf", "q3_weird")
    odd = tmp_path / "odd"
    shutil.copytree(model_dirs["llama"], odd)
    raw = json.loads((odd / "tokenizer.json").read_text())
    raw["pre_tokenizer"] = {"type": "Whitespace"}
    (odd / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(EdgeLoraError, match="pre-tokenizer"):
        export_gguf(ModelDir(odd), tmp_path / "y.gguf", "f32")
    assert not (tmp_path / "y.gguf").exists()  # atomic: no half-written file


def _sentencepiece_tokenizer(path):
    """A Llama-2-style tokenizer.json: SentencePiece BPE with byte fallback, "▁" for spaces, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        prepend_scheme="never", split=True
    )  # training only: merges stay inside words
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        TEXTS * 10,
        trainers.BpeTrainer(
            vocab_size=320,
            limit_alphabet=30,
            special_tokens=["<unk>", "<s>", "</s>", *bytes_],
            show_progress=False,
        ),
    )
    tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return tok


def test_sentencepiece_tokenizer_ids_equal_ours(model_dirs, tmp_path):
    import shutil

    md_path = tmp_path / "spm"
    shutil.copytree(model_dirs["llama"], md_path)  # 320-token model; the tokenizer below fits in it
    ours = _sentencepiece_tokenizer(md_path / "tokenizer.json")
    out = export_gguf(ModelDir(md_path), tmp_path / "spm.gguf", "f32")
    llm = _llama().Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in TEXTS[:4] + TEXTS[5:] + ["plain words the quick fox"]:
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert theirs == ours.encode(text).ids, text


@pytest.mark.parametrize("family,output_name", [("qwen2", "token_embd.weight"), ("llama", "output.weight")])
def test_low_bit_exports_keep_the_output_matrix_at_q8_0(model_dirs, tmp_path, family, output_name):
    """As llama.cpp's quantizer does: the matrix every logit reads stays above the base type."""
    import gguf

    path = export_gguf(ModelDir(model_dirs[family]), tmp_path / "m.gguf", "q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types[output_name] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    if family == "llama":  # untied: the input embedding keeps the base type
        assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q4_0
