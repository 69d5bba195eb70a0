"""The tokenizer part of a GGUF: a Hugging Face tokenizer.json as llama.cpp's vocabulary keys.

Two kinds are understood, the two that Llama-family models ship:
- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): ``tokenizer.ggml.model = "gpt2"`` with merges and
  the pre-tokenizer named by llama.cpp (``pre``), recognised from the tokenizer.json's own regex;
- SentencePiece BPE with byte fallback (Llama 2, Mistral): ``tokenizer.ggml.model = "llama"``, whose
  scores make llama.cpp's merge order equal the merge ranks.
BOS/EOS handling is read from what the tokenizer actually does, so llama.cpp adds the same tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError

# llama.cpp's pre-tokenizer names, keyed by the Split regex a tokenizer.json uses
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
SPLIT_REGEX_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}

# gguf token types (gguf.TokenType values, named here to keep this table readable)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufVocab:
    model: str  # "gpt2" | "llama"
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for key, value in (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id), ("pad", self.pad_id)):
            if value is not None:
                getattr(writer, f"add_{key}_token_id")(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def read_vocab(tokenizer_path: Path, tokenizer_config: dict, config: ModelConfig) -> GgufVocab:
    """Read tokenizer.json (+ tokenizer_config.json) into the keys llama.cpp needs."""
    try:
        raw = json.loads(Path(tokenizer_path).read_text(encoding="utf-8"))
        model = raw["model"]
        vocab: dict[str, int] = model["vocab"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise EdgeLoraError("tokenizer.json is not a fast-tokenizer file with a model vocabulary", path=tokenizer_path) from None
    if model.get("type") != "BPE":
        raise EdgeLoraError(f"tokenizer model {model.get('type')!r} cannot be written to GGUF yet", path=tokenizer_path,
                            hint="byte-level BPE and SentencePiece-BPE tokenizers are supported")
    added = {t["id"]: t for t in raw.get("added_tokens") or []}
    id_to_text = {i: t for t, i in vocab.items()}
    id_to_text.update({i: t["content"] for i, t in added.items()})
    size = max(config.vocab_size, max(id_to_text) + 1)
    if size > config.vocab_size:
        raise EdgeLoraError(f"tokenizer has {max(id_to_text) + 1} tokens but the model's vocab_size is {config.vocab_size}",
                            path=tokenizer_path, hint="tokenizer and model do not belong together")
    spm = bool(model.get("byte_fallback"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tokens, types = [], []
    for i in range(size):
        text = id_to_text.get(i)
        if text is None:  # the embedding is larger than the tokenizer: named, and never matched in text
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(BYTE)
        elif text == model.get("unk_token"):
            tokens.append(text)
            types.append(UNKNOWN)
        elif i in added:
            tokens.append(text)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(text)
            types.append(NORMAL)
    bos, eos, add_bos, add_eos = _special_behaviour(tokenizer_path, config)
    result = GgufVocab(model="llama" if spm else "gpt2", pre=None if spm else _pre_name(raw, tokenizer_path),
                       tokens=tokens, token_types=types, bos_id=bos, eos_id=eos, add_bos=add_bos, add_eos=add_eos,
                       chat_template=_chat_template(tokenizer_config, Path(tokenizer_path).parent))
    unk = model.get("unk_token")
    result.unk_id = vocab.get(unk) if unk else None
    pad = tokenizer_config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    result.pad_id = next((i for i, t in id_to_text.items() if t == pad), None) if pad else None
    if spm:
        result.scores = _spm_scores(tokens, merges)
        result.add_space_prefix = _adds_space_prefix(raw)
    else:
        result.merges = merges
    return result


def _pre_name(raw: dict, path) -> str:
    pre = raw.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEX_PRE:
            return SPLIT_REGEX_PRE[regex]
    raise EdgeLoraError(f"tokenizer.json's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp equivalent here",
                        path=path, hint="known: GPT-2, Llama 3, Qwen2, SmolLM byte-level BPE; use the ONNX backend for this model")


def _special_behaviour(path, config: ModelConfig) -> tuple[int | None, int | None, bool, bool]:
    """BOS/EOS ids and whether the tokenizer adds them, found by encoding a probe."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    start = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), 0)
    add_bos, add_eos = start > 0, len(full) > start + len(plain)
    bos = full[0] if add_bos else config.bos_token_id
    eos = full[-1] if add_eos else (config.eos_token_id[0] if config.eos_token_id else None)
    return bos, eos, add_bos, add_eos


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the best-scoring pair first: score = -merge rank."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(raw: dict) -> bool:
    text = json.dumps([raw.get("normalizer"), raw.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text or '"add_prefix_space": true' in text


def _chat_template(tokenizer_config: dict, model_dir: Path) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp takes the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None
