"""The checks on an adapter's token rows (its new tokens and the base rows it replaces), in one place.

Adding an adapter (the runtime on both backends, ``export`` and ``export --add-adapter``, the PEFT
import), training with ``--add-tokens`` and ``inspect`` all call these, so a file one of them refuses
the others refuse with the same one-line message:

- :func:`check_token_rows` needs nothing but the adapter: as many rows as tokens, distinct non-empty
  token strings, one row width;
- :func:`check_token_rows_fit` needs the base's config: the row width is its hidden size, replaced ids
  are base ids, an untied base gets output rows;
- :func:`check_new_token_strings` needs the base's vocabulary: a new token whose string the base
  already has would give one string two ids while the adapter is active.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.adapter_format import EMBED_ROWS, HEAD_ROWS, REMAKE, REPLACED_EMBED_ROWS, REPLACED_HEAD_ROWS
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    import numpy as np

    from edge_lora.adapter import Adapter
    from edge_lora.config import ModelConfig

# a base vocabulary's id for a string, None when the base has no such token
TokenId = Callable[[str], "int | None"]
PathLike = str | os.PathLike | None


def _rows(adapter: Adapter) -> list[tuple[str, np.ndarray | None, int]]:
    """``(tensor name, rows, how many rows the metadata asks for)`` of each token-row tensor."""
    n_new, n_replaced = len(adapter.added_tokens), len(adapter.replaced_tokens)
    return [
        (EMBED_ROWS, adapter.embed_rows, n_new),
        (HEAD_ROWS, adapter.head_rows, n_new),
        (REPLACED_EMBED_ROWS, adapter.replaced_embed_rows, n_replaced),
        (REPLACED_HEAD_ROWS, adapter.replaced_head_rows, n_replaced),
    ]


def check_token_rows(adapter: Adapter, path: PathLike = None) -> None:
    """What needs no base: each listed token (or replaced id) has exactly one row in each table given."""
    tokens = adapter.added_tokens
    if any(not t for t in tokens) or len(set(tokens)) != len(tokens):
        dup = next((t for t in tokens if not t or tokens.count(t) > 1), "")
        raise EdgeLoraError(f"metadata lists new token {dup!r} twice or empty", path=path, hint=REMAKE)
    if any(i < 0 for i in adapter.replaced_tokens):
        raise EdgeLoraError(
            f"replaced token ids {adapter.replaced_tokens[:4]} include a negative id", path=path, hint=REMAKE
        )
    for kind, needed, rows in (
        ("new tokens", adapter.added_tokens, adapter.embed_rows),
        ("replaced token ids", adapter.replaced_tokens, adapter.replaced_embed_rows),
    ):
        if needed and rows is None:
            raise EdgeLoraError(
                f"metadata lists {len(needed)} {kind} but the file holds no embedding rows for them",
                path=path,
                hint=REMAKE,
            )
    widths = set()
    for name, rows, count in _rows(adapter):
        if rows is None:
            continue
        if rows.ndim != 2 or rows.shape[0] != count:
            raise EdgeLoraError(
                f"{name} {list(rows.shape)} does not hold one row for each of the {count} tokens the "
                "metadata lists",
                path=path,
                hint=REMAKE,
            )
        widths.add(rows.shape[1])
    if len(widths) > 1:
        raise EdgeLoraError(f"token rows of different widths {sorted(widths)}", path=path, hint=REMAKE)


def check_token_rows_fit(adapter: Adapter, base: ModelConfig, path: PathLike = None) -> None:
    """What needs the base's config (after :func:`check_token_rows`)."""
    check_token_rows(adapter, path)
    for name, rows, _ in _rows(adapter):
        if rows is not None and rows.shape[1] != base.hidden_size:
            raise EdgeLoraError(
                f"{name} {list(rows.shape)} do not fit hidden size {base.hidden_size}",
                path=path,
                hint="wrong base model?",
            )
    check_ids_in_vocab("replaced token ids", adapter.replaced_tokens, base, path)
    if base.tie_word_embeddings:
        return
    if adapter.added_tokens and adapter.head_rows is None:
        raise EdgeLoraError(
            "adapter adds tokens to a base with an untied output layer but holds no output rows for them",
            path=path,
            hint="train the adapter again (the trainer saves lm_head rows)",
        )
    if adapter.replaced_tokens and adapter.replaced_head_rows is None:
        raise EdgeLoraError(
            "adapter replaces base token rows on a base with an untied output layer but holds no output "
            "rows for them",
            path=path,
            hint="import the adapter again",
        )


def check_new_token_strings(tokens: Sequence[str], base_id: TokenId, path: PathLike = None) -> None:
    """Refuse a new token whose string the base vocabulary already has, naming it and its base id."""
    for token in tokens:
        found = base_id(token)
        if found is not None:
            raise EdgeLoraError(
                f"new token {token!r} is already in the base vocabulary as id {found}: with the adapter "
                "active one string would have two ids",
                path=path,
                hint=f"add only strings the base lacks, or train the base's own token (id {found})",
            )


def base_token_ids(tokenizer_path: str | os.PathLike) -> TokenId:
    """The base vocabulary's lookup from its ``tokenizer.json`` (the added tokens included)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(os.fspath(tokenizer_path))
    except Exception as err:  # the Rust side raises a bare Exception on bad JSON
        raise EdgeLoraError(
            f"cannot read tokenizer ({str(err).splitlines()[0][:120] if str(err) else type(err).__name__})",
            path=Path(tokenizer_path),
            hint="the tokenizer.json is corrupt or not a fast-tokenizer file",
        ) from None
    return tok.token_to_id


def check_ids_in_vocab(what: str, ids: list[int], base: ModelConfig, path: PathLike = None) -> None:
    """Refuse base token ids past the base vocabulary (an adapter made for another base)."""
    past = [i for i in ids if i >= base.vocab_size]
    if past:
        raise EdgeLoraError(
            f"{what} {past[:4]} are past the base vocabulary ({base.vocab_size} tokens)",
            path=path,
            hint="wrong base model?",
        )
