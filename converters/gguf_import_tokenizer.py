"""A GGUF's vocabulary as the tokenizer.json and tokenizer_config.json of a Hugging Face folder.

The inverse of converters/gguf_tokenizer.py, built with the ``tokenizers`` library and following what
llama.cpp does with the same keys (the GGUF's runtime, so the reference where tokenizers disagree):
- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE with the file's merges, split as llama.cpp's
  pre-tokenizer named in ``tokenizer.ggml.pre`` splits (gpt-2; smollm/starcoder/refact: each digit
  alone, then GPT-2's regex; llama-bpe: Llama 3's regex, a word in the vocabulary taken whole; qwen2);
- ``"llama"``: SentencePiece-style BPE with byte fallback, merges ranked by the tokens' scores (the
  order llama.cpp merges in), spaces as "▁" and, with ``add_space_prefix`` (llama.cpp's default), a
  "▁" before each stretch of text, as llama.cpp puts one before the text and after each special token.
Control tokens become special added tokens, user-defined ones plain added tokens (llama.cpp matches
both whole). BOS/EOS are added as ``add_bos_token``/``add_eos_token`` say, else as llama.cpp would.
Anything else is refused with one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from converters.gguf_tokenizer import LLAMA3_REGEX, QWEN2_REGEX
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.file_read import field_value

if TYPE_CHECKING:
    import gguf
    from tokenizers import Tokenizer

SPACE = "\u2581"
# gguf.TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
DIGITS_PRE = ("smollm", "starcoder", "refact")  # llama.cpp: "\p{N}", then GPT-2's regex
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp ignores merges for these
QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
BYTE_LEVEL_PRE = ("gpt-2", *DIGITS_PRE, *LLAMA3_PRE, *QWEN2_PRE)


def tokenizer_files(reader: gguf.GGUFReader, path: Path, context_length: int) -> dict[str, str]:
    """``{file name: text}`` for tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer

    kind = field_value(reader, "tokenizer.ggml.model")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama"):
        raise EdgeLoraError(
            f"tokenizer model {kind!r} cannot be imported",
            path=path,
            hint='supported: "gpt2" (byte-level BPE) and "llama" (SentencePiece BPE)',
        )
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise EdgeLoraError("GGUF has no tokenizer.ggml.tokens", path=path, hint="the file has no vocabulary")
    types = field_value(reader, "tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not _list_of(types, int, len(tokens)):
        raise EdgeLoraError("tokenizer.ggml.token_type does not match the tokens", path=path)
    special = _special(reader, tokens, kind, path)
    if kind == "gpt2":
        tok = _byte_level(reader, tokens, path)
    else:
        tok = _sentencepiece(reader, tokens, types, special, path)
    _add_tokens(tok, tokens, types)
    raw = json.loads(tok.to_str())
    raw["post_processor"] = _post_processor(special, byte_level=kind == "gpt2")
    text = json.dumps(raw, ensure_ascii=False)
    try:
        Tokenizer.from_str(text)  # the library must read back what it will be handed
    except Exception as err:  # noqa: BLE001 - its errors are plain Exception
        raise EdgeLoraError(f"the vocabulary makes no valid tokenizer.json ({err})", path=path) from None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # runs tokenizer.json as written
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(context_length),
        **{f"{k}_token": special[k] for k in ("bos", "eos", "unk", "pad")},
        "add_bos_token": special["add_bos"],
        "add_eos_token": special["add_eos"],
    }
    template = field_value(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        config["chat_template"] = template
    return {"tokenizer.json": text, "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


def _special(reader: gguf.GGUFReader, tokens: list[str], kind: str, path: Path) -> dict:
    """bos/eos/unk/pad token texts and whether BOS/EOS are added (llama.cpp's defaults where unsaid)."""
    out: dict = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = field_value(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens)):
            raise EdgeLoraError(f"tokenizer.ggml.{key}_token_id {i} is not a token id", path=path)
        out[name] = None if i is None else tokens[int(i)]
        out[f"{name}_id"] = None if i is None else int(i)
    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    default_bos = kind == "llama" or pre in LLAMA3_PRE
    out["add_bos"] = (
        bool(field_value(reader, "tokenizer.ggml.add_bos_token", default_bos)) and out["bos"] is not None
    )
    out["add_eos"] = (
        bool(field_value(reader, "tokenizer.ggml.add_eos_token", False)) and out["eos"] is not None
    )
    return out


def _list_of(value: object, kind: type | tuple[type, ...], length: int) -> bool:
    return isinstance(value, list) and len(value) == length and all(isinstance(v, kind) for v in value)


def _vocab(tokens: list[str]) -> dict[str, int]:
    """text -> id; a text listed twice gets its last id, as llama.cpp's and transformers' lookups do."""
    return {text: i for i, text in enumerate(tokens)}


def _byte_level(reader: gguf.GGUFReader, tokens: list[str], path: Path) -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in BYTE_LEVEL_PRE:
        raise EdgeLoraError(
            f"byte-level pre-tokenizer {pre!r} cannot be imported",
            path=path,
            hint=f"supported tokenizer.ggml.pre: {', '.join(BYTE_LEVEL_PRE)}",
        )
    vocab = _vocab(tokens)
    merges = []
    listed = field_value(reader, "tokenizer.ggml.merges") or []
    for merge in listed if isinstance(listed, list) else [listed]:
        left, sep, right = merge.partition(" ") if isinstance(merge, str) else ("", "", "")
        # the tokenizers library panics on a merge whose parts or result are not tokens
        if not sep or left not in vocab or right not in vocab or left + right not in vocab:
            raise EdgeLoraError(f"merge {merge!r} is not two tokens making a third", path=path)
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in LLAMA3_PRE))
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=pre not in (*LLAMA3_PRE, *QWEN2_PRE)
    )
    if pre in DIGITS_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in (*LLAMA3_PRE, *QWEN2_PRE):
        regex = LLAMA3_REGEX if pre in LLAMA3_PRE else QWEN2_REGEX
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(
    reader: gguf.GGUFReader, tokens: list[str], types: list[int], special: dict, path: Path
) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = field_value(reader, "tokenizer.ggml.scores")
    if not _list_of(scores, (int, float), len(tokens)):
        raise EdgeLoraError(
            "a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token", path=path
        )
    unk = special["unk"] or next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
    vocab = _vocab(tokens)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=sentencepiece_merges(tokens, scores, vocab),
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(field_value(reader, "tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace] if prefix else [replace])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def sentencepiece_merges(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scoring result first (llama.cpp merges the pair whose
    result scores highest). The same order as transformers' ``generate_merges`` for GGUF vocabularies."""
    ranked = []
    for text, score in dict(zip(tokens, scores)).items():
        local = [(text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in vocab and text[k:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        ranked.extend((left, right, float(score)) for left, right in local)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]


def _add_tokens(tok: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens as special added tokens, user-defined ones as plain added tokens: matched whole."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED
    ]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def _post_processor(special: dict, byte_level: bool) -> dict | None:
    """tokenizer.json's post-processor, written as JSON: the library's string templates cannot name a
    token whose text holds a colon or a space."""
    steps = []
    if byte_level:
        steps.append(
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
        )
    added = [k for k in ("bos", "eos") if special[f"add_{k}"]]
    if added:

        def piece(kind: str, type_id: int) -> list[dict]:
            bos = [{"SpecialToken": {"id": special["bos"], "type_id": type_id}}] if "bos" in added else []
            eos = [{"SpecialToken": {"id": special["eos"], "type_id": type_id}}] if "eos" in added else []
            return [*bos, {"Sequence": {"id": kind, "type_id": type_id}}, *eos]

        tokens = {
            special[k]: {"id": special[k], "ids": [special[f"{k}_id"]], "tokens": [special[k]]} for k in added
        }
        steps.append(
            {
                "type": "TemplateProcessing",
                "single": piece("A", 0),
                "pair": piece("A", 0) + piece("B", 1),
                "special_tokens": tokens,
            }
        )
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "processors": steps}
