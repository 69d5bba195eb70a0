"""The tokenizer part of a GGUF: a Hugging Face tokenizer.json as llama.cpp's vocabulary keys.

Two kinds are understood, the two that Llama-family models ship:
- byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM): ``tokenizer.ggml.model = "gpt2"`` with merges and
  the pre-tokenizer named by llama.cpp (``pre``), recognised from the tokenizer.json's own regex;
- SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama, Phi-3): ``tokenizer.ggml.model =
  "llama"``, ``pre = "default"``, whose scores make llama.cpp's merge order equal the merge ranks, and
  whose ``add_space_prefix`` says whether the tokenizer puts a "▁" before the text (a ``Prepend``
  normalizer, or a ``Metaspace`` pre-tokenizer that prepends).
BOS/EOS handling is read from what the tokenizer actually does, so llama.cpp adds the same tokens.
Any other shape is refused with a one-line error rather than written as a GGUF that tokenizes differently.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.chat_template import ChatTemplate, token_text
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    import gguf

# llama.cpp's pre-tokenizer names, keyed by the Split regex a tokenizer.json uses
LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
SPLIT_REGEX_PRE = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}
IGNORE_MERGES_PRE = {
    "llama-bpe"
}  # llama.cpp takes a whole pre-token that is in the vocabulary as it is for these
SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space in its tokens
SPM_PRE = "default"  # what llama.cpp's converter and its reference vocabulary write for SentencePiece models
NO_MERGE_SCORE = -1e9  # a multi-character token no merge makes: llama.cpp must merge into it last, if ever


@dataclass
class GgufVocab:
    model: str  # "gpt2" | "llama"
    pre: str | None
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    special: gguf.SpecialVocab  # merges (byte-level BPE only), special token ids, add_bos/eos, chat template
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    notes: list[str] = field(
        default_factory=list
    )  # where llama.cpp may still differ, for the exporter to say

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocab(tokenizer_path: Path, tokenizer_config: dict, config: ModelConfig) -> GgufVocab:
    """Read tokenizer.json (+ tokenizer_config.json) into the keys llama.cpp needs."""
    raw, model = _bpe_tokenizer_json(tokenizer_path)
    added = {t["id"]: t for t in raw.get("added_tokens") or []}
    id_to_text = _id_to_text(model["vocab"], added, config, tokenizer_path)
    spm = bool(model.get("byte_fallback"))
    space_prefix = (
        _spm_space_prefix(raw, tokenizer_path) if spm else None
    )  # refuses a shape llama.cpp cannot follow
    # a SentencePiece vocabulary's "<unk>" may be named only in tokenizer_config.json;
    # byte-level BPE never needs one
    unk_text = model.get("unk_token") or (token_text(tokenizer_config.get("unk_token")) if spm else None)
    tokens, types = _token_table(config.vocab_size, id_to_text, added, spm, unk_text)
    special = _special_vocab(tokenizer_path, tokenizer_config, config, id_to_text, unk_text)
    result = GgufVocab(
        model="llama" if spm else "gpt2",
        pre=SPM_PRE if spm else _pre_name(raw, tokenizer_path),
        tokens=tokens,
        token_types=types,
        special=special,
    )
    if spm:  # llama.cpp's SentencePiece tokenizer merges by score, not by a merge list
        result.scores = _spm_scores(tokens, types, special.merges)
        special.merges, special.load_merges = [], False  # not written (and no warning that they are not)
        result.add_space_prefix = space_prefix
        result.notes += _spm_notes(raw)
    else:
        _check_byte_level(raw, model, result.pre, tokenizer_path)
    return result


def _bpe_tokenizer_json(path: Path) -> tuple[dict, dict]:
    """tokenizer.json and its BPE ``model`` part, or a one-line error."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        model = raw["model"]
        if not isinstance(model["vocab"], dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise EdgeLoraError(
            "tokenizer.json is not a fast-tokenizer file with a model vocabulary", path=path
        ) from None
    if model.get("type") != "BPE":
        raise EdgeLoraError(
            f"tokenizer model {model.get('type')!r} cannot be written to GGUF yet",
            path=path,
            hint="byte-level BPE and SentencePiece-BPE tokenizers are supported",
        )
    return raw, model


def _id_to_text(
    vocab: dict[str, int], added: dict[int, dict], config: ModelConfig, path: Path
) -> dict[int, str]:
    """Every token id's text, added tokens included; refuses a tokenizer larger than the embedding."""
    id_to_text = {i: t for t, i in vocab.items()}
    id_to_text.update({i: t["content"] for i, t in added.items()})
    if max(id_to_text) + 1 > config.vocab_size:
        raise EdgeLoraError(
            f"tokenizer has {max(id_to_text) + 1} tokens but the model's vocab_size is {config.vocab_size}",
            path=path,
            hint="tokenizer and model do not belong together",
        )
    return id_to_text


def _token_table(
    size: int, id_to_text: dict[int, str], added: dict[int, dict], spm: bool, unk_text: str | None
) -> tuple[list[str], list[int]]:
    """Each id's token text and gguf token type, for ``size`` ids (the embedding's rows)."""
    from gguf import TokenType

    tokens, types = [], []
    for i in range(size):
        text = id_to_text.get(i)
        if text is None:  # the embedding is larger than the tokenizer: named, and never matched in text
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(text)
        if spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(TokenType.BYTE)
        elif text == unk_text:
            types.append(TokenType.UNKNOWN)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _special_vocab(
    tokenizer_path: Path,
    tokenizer_config: dict,
    config: ModelConfig,
    id_to_text: dict[int, str],
    unk: str | None,
) -> gguf.SpecialVocab:
    """gguf-py's ``SpecialVocab`` of the model folder, which reads the merges as llama.cpp's converter does
    (spaces inside list-form merges encoded as it expects) and writes merges, special ids, add_bos/eos
    and the chat template. Its other readings differ from ours on real tokenizers, so ours replace them:
    - bos/eos and add_bos/add_eos: ours encode a probe with the tokenizer itself; SpecialVocab parses
      tokenizer_config and the post-processor's template ("crude parsing" by its own account: an extra
      add_sep, an eot id from the template), and leaves add_bos unwritten, where llama.cpp then uses a
      default of its own;
    - unk: ours only for a SentencePiece vocabulary (``unk``); SpecialVocab also names tokenizer_config's
      unk_token on byte-level BPE (StarCoder's "<|endoftext|>");
    - pad: ours finds tokenizer_config's pad_token anywhere in the vocabulary; SpecialVocab only among
      added tokens, else config.json's pad_token_id;
    - the chat template: the one the trainer and `edge-lora chat` use (``ChatTemplate.find``: the
      "default" of a named list); SpecialVocab writes every named template and also reads chat_template.json.
    """
    import gguf

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)  # its warnings are about the template parsing replaced below
    try:
        special = gguf.SpecialVocab(Path(tokenizer_path).parent, load_merges=True, special_token_types=())
    except ValueError as err:
        raise EdgeLoraError(f"cannot read the tokenizer's merges ({err})", path=tokenizer_path) from None
    finally:
        log.setLevel(level)
    bos, eos, add_bos, add_eos = _special_behaviour(tokenizer_path, config)
    pad = _id_of(token_text(tokenizer_config.get("pad_token")), id_to_text)
    ids = {"bos": bos, "eos": eos, "unk": _id_of(unk, id_to_text), "pad": pad}
    special.special_token_ids = {kind: i for kind, i in ids.items() if i is not None}
    special.add_special_token = {"bos": add_bos, "eos": add_eos}
    special.chat_template = _model_template(tokenizer_config, Path(tokenizer_path).parent)
    return special


def _pre_name(raw: dict, path: Path) -> str:
    pre = raw.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEX_PRE:
            return SPLIT_REGEX_PRE[regex]
    raise EdgeLoraError(
        f"tokenizer.json's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
        "equivalent here",
        path=path,
        hint="known: GPT-2, Llama 3, Qwen2, SmolLM byte-level BPE; use the ONNX backend for this model",
    )


def _check_byte_level(raw: dict, model: dict, pre: str, path: Path) -> None:
    """Refuse what llama.cpp's byte-level BPE would do differently: normalizing, or (not) ignoring merges."""
    normalizer = raw.get("normalizer")
    kinds = [s.get("type") for s in _steps(normalizer, "normalizers")]
    if kinds not in ([], ["NFC"]):  # NFC changes no text that is already NFC, which is nearly all text
        raise EdgeLoraError(
            f"byte-level BPE tokenizer with normalizer {' + '.join(map(str, kinds))} has no llama.cpp "
            "equivalent",
            path=path,
            hint="llama.cpp does not normalize text; use the ONNX backend for this model",
        )
    wanted = pre in IGNORE_MERGES_PRE
    if bool(model.get("ignore_merges")) != wanted:
        raise EdgeLoraError(
            f"tokenizer.json has ignore_merges={bool(model.get('ignore_merges'))} but llama.cpp's {pre!r} "
            f"pre-tokenizer has {wanted}, so some words would split differently",
            path=path,
            hint=f'set "ignore_merges": {str(wanted).lower()} in tokenizer.json if the model was '
            "trained that way",
        )


def _special_behaviour(path: Path, config: ModelConfig) -> tuple[int | None, int | None, bool, bool]:
    """BOS/EOS ids and whether the tokenizer adds them, found by encoding a probe."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    start = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), 0)
    add_bos, add_eos = start > 0, len(full) > start + len(plain)
    bos = full[0] if add_bos else config.bos_token_id
    eos = full[-1] if add_eos else (config.eos_token_id[0] if config.eos_token_id else None)
    return bos, eos, add_bos, add_eos


def _id_of(text: str | None, id_to_text: dict[int, str]) -> int | None:
    return next((i for i, t in sorted(id_to_text.items()) if t == text), None) if text else None


def _spm_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the best-scoring pair first: score = -merge rank.

    A multi-character normal token that no merge makes is never produced by the Hugging Face BPE, so it
    gets the lowest score; single characters and bytes are where merging starts, and their score is unused.
    """
    from gguf import TokenType

    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [
        -float(rank[t]) if t in rank else (NO_MERGE_SCORE if kind == TokenType.NORMAL and len(t) > 1 else 0.0)
        for t, kind in zip(tokens, types)
    ]


def _spm_space_prefix(raw: dict, path: Path) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text, as llama.cpp's add_space_prefix.

    llama.cpp turns spaces into "▁", optionally prepends one, and runs BPE over the whole text without
    splitting it and without normalizing; two tokenizer.json shapes do exactly that:
    - legacy (TinyLlama, Llama 2 as first converted): normalizer [Prepend "▁"], Replace " " -> "▁";
      no pre-tokenizer;
    - current (Mistral, Llama 2 converted since): no normalizer; Metaspace "▁" with split false, prepending
      ("first"/"always") or not ("never").
    """
    normalizer, pre = raw.get("normalizer"), raw.get("pre_tokenizer")
    steps = _steps(normalizer, "normalizers")
    kinds = [s.get("type") for s in steps]
    if (
        pre is None
        and kinds in (["Prepend", "Replace"], ["Replace"])
        and _replaces_space(steps[-1])
        and (kinds == ["Replace"] or steps[0].get("prepend") == SPACE)
    ):
        return kinds[0] == "Prepend"
    if (
        normalizer is None
        and isinstance(pre, dict)
        and pre.get("type") == "Metaspace"
        and pre.get("replacement") == SPACE
        and not pre.get("split", True)
    ):
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        return scheme != "never"
    style = f"normalizer {' + '.join(map(str, kinds)) or 'none'}, pre-tokenizer {_describe(pre)}"
    raise EdgeLoraError(
        f"SentencePiece-style tokenizer ({style}) has no faithful llama.cpp equivalent",
        path=path,
        hint="llama.cpp supports Prepend/Replace or an unsplit Metaspace; use the ONNX backend for this "
        "model",
    )


def _spm_notes(raw: dict) -> list[str]:
    pre = raw.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
        return [
            'llama.cpp (like SentencePiece) puts "\u2581" before text that already starts with a space, and '
            'after special tokens; this tokenizer.json (Metaspace, prepend_scheme "first") does not, so ids '
            "differ there"
        ]
    return []


def _steps(part: dict | None, key: str) -> list[dict]:
    if not part:
        return []
    return part.get(key, []) if part.get("type") == "Sequence" else [part]


def _replaces_space(step: dict) -> bool:
    return (
        step.get("type") == "Replace"
        and step.get("pattern") == {"String": " "}
        and step.get("content") == SPACE
    )


def _describe(pre: dict | None) -> str:
    if not pre:
        return "none"
    if pre.get("type") == "Metaspace":
        return f"Metaspace(split={pre.get('split', True)}, prepend_scheme={pre.get('prepend_scheme')})"
    return " + ".join(str(s.get("type")) for s in _steps(pre, "pretokenizers"))


def _model_template(tokenizer_config: dict, model_dir: Path) -> str | None:
    """The model's own chat template, found as the trainer and `edge-lora chat` find it (none: no key)."""
    template = ChatTemplate.find(tokenizer_config, model_dir)
    return template.source if template.origin == "model" else None


# --- what a written GGUF declares ---------------------------------------------------------------


def gguf_tokenizer_style(gguf_path: str | os.PathLike) -> str:
    """The tokenizer style a GGUF declares, in words (from its keys, as llama.cpp reads them)."""
    import gguf

    fields = gguf.GGUFReader(os.fspath(gguf_path)).fields

    def value(key: str, default: object = None) -> object:
        return fields[key].contents() if key in fields else default

    if value("tokenizer.ggml.model") == "llama":
        prefix = (
            "with" if value("tokenizer.ggml.add_space_prefix", True) else "without"
        )  # llama.cpp's default: with
        return f"SentencePiece BPE (byte fallback, {prefix} space prefix)"
    return f"byte-level BPE (pre-tokenizer {value('tokenizer.ggml.pre', 'default')})"
