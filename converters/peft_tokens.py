"""New tokens from a PEFT directory: ``trainable_token_indices``, resized embeddings in ``modules_to_save``.

PEFT writes new tokens two ways, both on a model whose embedding was resized to ``vocab + n``:

- ``trainable_token_indices={"embed_tokens": [ids]}``:
  ``...embed_tokens.token_adapter.trainable_tokens_delta`` ``[k, hidden]`` holds the trained rows of
  those ids (their values, not a difference), beside the resized table (``token_adapter.base_layer.weight``)
  that ``save_embedding_layers`` adds; a tied head
  gets the same pair under ``lm_head.``, an untied one its resized ``lm_head.weight``.
- ``modules_to_save=["embed_tokens", "lm_head"]``: the whole trained tables
  (``<module>.modules_to_save.weight``, plus ``original_module.weight`` / ``<module>.weight`` copies).

Both become our form (:class:`edge_lora.adapter.Adapter`'s ``added_tokens`` / ``embed_rows`` /
``head_rows``): the rows past the base vocabulary, once the saved rows of the base vocabulary are
checked to equal the base's (a whole trained table, ``modules_to_save`` trained on base tokens, is a
change of the base itself: refused). ``trainable_token_indices`` on existing ids becomes
``replaced_tokens`` / ``replaced_embed_rows`` (and, untied, the base's own ``lm_head`` rows of those
ids as ``replaced_head_rows``): rows that replace the base's while the adapter is active. The new
tokens' strings come from the ``tokenizer.json`` saved beside the adapter (its added tokens at those ids).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import SafetensorsFile

if TYPE_CHECKING:
    from edge_lora.model_dir import ModelDir

EMBED, HEAD = "model.embed_tokens", "lm_head"
MODULES = ("embed_tokens", "lm_head")  # what modules_to_save may name: the tables new tokens grow
_TABLE_SUFFIXES = (
    "modules_to_save.weight",
    "token_adapter.base_layer.weight",
    "original_module.weight",
    "weight",
)
_DELTA = "token_adapter.trainable_tokens_delta"
# base_rows(table name, rows [V, hidden]) -> whether they equal the base's table (None: cannot tell)
BaseRows = Callable[[str, np.ndarray], "bool | None"]
# a tensor by its name without the PEFT prefix, as float32 (None: not in the file)
Reader = Callable[[str], "np.ndarray | None"]


@dataclass
class PeftTokens:
    keys: set[str]  # the safetensors keys these tensors used (none of them is a LoRA tensor)
    tokens: list[str]
    embed_rows: np.ndarray | None
    head_rows: np.ndarray | None
    replaced: list[int] = field(default_factory=list)  # base ids whose rows were retrained
    replaced_embed: np.ndarray | None = None
    replaced_head: np.ndarray | None = None  # untied bases: the base's own lm_head rows of those ids


def token_keys(name: str) -> bool:
    """Whether a PEFT key (without ``base_model.model.``) is one of the token tables'."""
    return any(name == f"{m}.{s}" for m in (EMBED, HEAD) for s in (*_TABLE_SUFFIXES, _DELTA))


def check_config(cfg: dict, cfg_path: Path) -> None:
    """``modules_to_save`` may only hold the token tables; ``trainable_token_indices`` only the embedding."""
    extra = [m for m in cfg.get("modules_to_save") or [] if m not in MODULES]
    if extra:
        raise EdgeLoraError(
            f"adapter fully trains {', '.join(extra)} (modules_to_save), which is no LoRA adapter",
            path=cfg_path,
            hint="merge it with PEFT (merge_and_unload) and export the merged model as the base",
        )
    indices = cfg.get("trainable_token_indices")
    if indices is not None and not isinstance(indices, (list, dict)):
        raise EdgeLoraError(
            "adapter_config.json: trainable_token_indices must be a list or an object", path=cfg_path
        )
    if isinstance(indices, dict) and set(indices) - {"embed_tokens"}:
        raise EdgeLoraError(
            f"trainable_token_indices on {sorted(set(indices) - {'embed_tokens'})}: only embed_tokens "
            "is supported",
            path=cfg_path,
            hint="train the new tokens on embed_tokens",
        )


def take_tokens(
    st: SafetensorsFile,
    prefix: str,
    cfg: dict,
    path: Path,
    base: ModelConfig | None,
    base_rows: BaseRows | None,
) -> PeftTokens | None:
    """The new tokens (and replaced base rows) in a PEFT file, or None when it has no token tables."""
    keys = {k for k in st.keys() if token_keys(k[len(prefix) :] if k.startswith(prefix) else k)}
    if not keys:
        return None
    weights = path / "adapter_model.safetensors"
    get = _reader(st, prefix, weights)
    indices = cfg.get("trainable_token_indices")
    indices = list(
        indices.get("embed_tokens", []) if isinstance(indices, dict) else (indices or [])
    )  # delta's row order
    saved, embed = _table(get, EMBED, indices, weights)
    if base is None or embed is None:  # no base to measure against (inspect), or nothing to measure
        return PeftTokens(keys, [], None, None)
    vocab = base.vocab_size
    if embed.shape[1] != base.hidden_size or embed.shape[0] < vocab:
        raise EdgeLoraError(
            f"embedding table {list(embed.shape)} does not fit the base's [{vocab}, {base.hidden_size}]",
            path=weights,
            hint="wrong base model?",
        )
    _check_base_rows(EMBED, saved[:vocab], base_rows, weights)  # the table before trainable_tokens_delta
    head = _head_table(get, embed, indices, base, base_rows, weights)
    return _found_tokens(keys, path, saved, embed, head, indices, base)


def _head_table(
    get: Reader,
    embed: np.ndarray,
    indices: list[int],
    base: ModelConfig,
    base_rows: BaseRows | None,
    weights: Path,
) -> np.ndarray | None:
    """The trained output head's table: the embedding's for a tied base, else its own (checked) table."""
    vocab = base.vocab_size
    _, head = _table(get, HEAD, indices if base.tie_word_embeddings else [], weights)
    if base.tie_word_embeddings:
        if head is not None and not np.array_equal(head, embed):
            raise EdgeLoraError(
                "the tied lm_head was saved with rows that differ from the embedding's (PEFT trained "
                "two copies of the tied table)",
                path=weights,
                hint="train with the head tied (PEFT's ensure_weight_tying=True) or on embed_tokens only",
            )
        return embed
    if head is None:
        if embed.shape[0] > vocab:
            raise EdgeLoraError(
                "the embedding was resized but no resized lm_head is saved",
                path=weights,
                hint="save with PEFT's save_embedding_layers=True (its default for a resized model)",
            )
        return None
    if head.shape != embed.shape:
        raise EdgeLoraError(
            f"lm_head table {list(head.shape)} and embedding table {list(embed.shape)} differ in size",
            path=weights,
            hint="save the adapter again with PEFT",
        )
    _check_base_rows(HEAD, head[:vocab], base_rows, weights)
    return head


def _found_tokens(
    keys: set[str],
    path: Path,
    saved: np.ndarray,
    embed: np.ndarray,
    head: np.ndarray | None,
    indices: list[int],
    base: ModelConfig,
) -> PeftTokens:
    """Rows past the base vocabulary are new tokens; trained rows of existing ids replace the base's."""
    vocab, tied = base.vocab_size, base.tie_word_embeddings
    # trainable_token_indices on existing ids: their rows replace the base's while the adapter is active
    replaced = sorted({i for i in indices if i < vocab and not np.array_equal(embed[i], saved[i])})
    if replaced and head is None:
        raise EdgeLoraError(
            "base token rows were retrained but no lm_head is saved beside them",
            path=path / "adapter_model.safetensors",
            hint="save with PEFT's save_embedding_layers=True",
        )
    n = embed.shape[0] - vocab
    found = PeftTokens(
        keys,
        _token_strings(path, vocab, n) if n else [],
        embed[vocab:].copy() if n else None,
        head[vocab:].copy() if n and not tied else None,
    )
    if replaced:
        found.replaced, found.replaced_embed = replaced, embed[replaced].copy()
        found.replaced_head = None if tied else head[replaced].copy()
    return found


def _reader(st: SafetensorsFile, prefix: str, weights: Path) -> Reader:
    def get(name: str) -> np.ndarray | None:
        key = prefix + name if prefix + name in st.keys() else name
        if key not in st.keys():
            return None
        arr = st.get(key).astype(np.float32)
        if not np.isfinite(arr).all():
            raise EdgeLoraError(f"tensor {key!r} holds NaN or Inf", path=weights)
        return arr

    return get


def _table(
    get: Reader, module: str, indices: list[int], weights: Path
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A module's saved full table, as saved and with ``trainable_tokens_delta`` written into its rows."""
    table = next((t for t in (get(f"{module}.{s}") for s in _TABLE_SUFFIXES) if t is not None), None)
    delta = get(f"{module}.{_DELTA}")
    if delta is None:
        return table, table
    if table is None:
        raise EdgeLoraError(
            f"{module}: trainable_tokens_delta without the resized table beside it",
            path=weights,
            hint="save with PEFT's save_embedding_layers=True",
        )
    if delta.shape != (len(indices), table.shape[1]) or any(not 0 <= i < table.shape[0] for i in indices):
        raise EdgeLoraError(
            f"{module}: trainable_tokens_delta {list(delta.shape)} does not fit trainable_token_indices "
            f"{indices} on a table of {table.shape[0]} rows",
            path=weights,
            hint="save the adapter again with PEFT",
        )
    trained = table.copy()
    trained[np.asarray(indices, dtype=np.int64)] = delta
    return table, trained


def _check_base_rows(name: str, rows: np.ndarray, base_rows: BaseRows | None, weights: Path) -> None:
    same = None if base_rows is None else base_rows(f"{name}.weight", rows)
    if same is None:
        raise EdgeLoraError(
            f"the saved {name} table cannot be checked against the base here",
            path=weights,
            hint="import it with `edge-lora export MODEL_DIR --adapter DIR`, which compares it to the base",
        )
    if not same:
        raise EdgeLoraError(
            f"the saved {name} rows of the base vocabulary differ from the base's: the whole table was "
            "trained (modules_to_save), which is no adapter",
            path=weights,
            hint="train only chosen tokens (trainable_token_indices), or merge with PEFT and export "
            "the merged model as the base",
        )


def _token_strings(path: Path, vocab: int, n: int) -> list[str]:
    """The strings of ids ``vocab .. vocab + n - 1`` from the tokenizer.json saved beside the adapter."""
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise EdgeLoraError(
            f"the adapter adds {n} tokens but no tokenizer.json beside it names them",
            path=path,
            hint="save the tokenizer there too: tokenizer.save_pretrained(DIR)",
        )
    try:
        added = json.loads(tok.read_text(encoding="utf-8")).get("added_tokens") or []
        by_id = {int(t["id"]): str(t["content"]) for t in added}
    except (
        json.JSONDecodeError,
        UnicodeDecodeError,
        RecursionError,
        TypeError,
        KeyError,
        ValueError,
        AttributeError,
    ):
        raise EdgeLoraError(
            "tokenizer.json beside the adapter is not a valid tokenizer file", path=tok
        ) from None
    missing = [i for i in range(vocab, vocab + n) if i not in by_id]
    if missing:
        raise EdgeLoraError(
            f"tokenizer.json names no token for ids {missing[:8]} (the adapter's new rows)",
            path=tok,
            hint="save the tokenizer the adapter was trained with beside it",
        )
    return [by_id[i] for i in range(vocab, vocab + n)]


def model_dir_rows(md: ModelDir) -> BaseRows:
    """Compare saved rows with a model directory's own tables (at full or half precision)."""
    from converters.tied_head import same_table

    def check(name: str, rows: np.ndarray) -> bool:
        table = name if md.has(name) else "model.embed_tokens.weight"  # a tied base's head is its embedding
        return same_table(rows, md.get(table))

    return check
