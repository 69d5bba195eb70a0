"""Tokens that adapters add: one request's vocabulary, its extra rows, and the clash rules.

An adapter's new token ``i`` has id ``base_vocab + i`` and its own embedding row (and, on an
untied base, output row; a tied base reuses the embedding row). A request sees the new tokens of
the adapters in its set and nothing else: other requests keep the base vocabulary. Two adapters in
one set agree when every id they both define has the same string and the same rows; a string
defined at two ids, an id with two strings, or one token with two different rows is a clash.
Rows are used as they are, whatever the adapter's scale in the set: a token is defined or not.

An adapter may also replace base tokens' rows (PEFT's ``trainable_token_indices`` on existing ids).
The backends only know "rows past the base vocabulary", so a replaced id ``k`` gets an internal slot
after the new tokens: :meth:`AddedVocab.to_model` sends ``k`` there, :meth:`AddedVocab.from_model`
moves that slot's logit back to column ``k``. Two adapters replacing one id must give it the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.token_rows import check_token_rows_fit


@dataclass(frozen=True)
class AddedVocab:
    """The new tokens of one adapter set: ids ``base_vocab ..`` ``base_vocab + n - 1``."""

    base_vocab: int
    tokens: tuple[str, ...] = ()
    embed: np.ndarray | None = None  # [n + r, hidden] float32: the new tokens', then the replaced ids'
    head: np.ndarray | None = None  # [n + r, hidden] float32: output rows (the embed rows on a tied base)
    replaced: tuple[int, ...] = ()  # base ids with replaced rows, in slot order (slot V + n + j)

    @property
    def n(self) -> int:
        return len(self.tokens)

    @property
    def size(self) -> int:
        """Ids this request may see and sample: the base vocabulary plus the new tokens."""
        return self.base_vocab + self.n

    @property
    def rows(self) -> int:
        """Rows the backends get past the base vocabulary (new tokens, then replaced ids)."""
        return self.n + len(self.replaced)

    def to_model(self, ids: list[int]) -> list[int]:
        """The ids the backends run: a replaced base id goes to its slot."""
        if not self.replaced:
            return ids
        slots = {k: self.size + j for j, k in enumerate(self.replaced)}
        return [slots.get(i, i) for i in ids]

    def from_model(self, logits: np.ndarray) -> np.ndarray:
        """The backend's logits ``[..., >= size + r]`` as this request sees them: ``[..., size]``."""
        if not self.replaced:
            return logits[..., : self.size]
        out = logits[..., : self.size].copy()
        out[..., list(self.replaced)] = logits[..., self.size : self.size + len(self.replaced)]
        return out


def combine(adapters: list[tuple[str, Adapter]], config: ModelConfig) -> AddedVocab:
    """The new tokens (and replaced base rows) of ``[(name, adapter), ...]`` together; an
    ``EdgeLoraError`` on a clash."""
    tokens: list[str] = []
    embed: list[np.ndarray] = []
    head: list[np.ndarray] = []
    owner: list[str] = []  # which adapter defined each id first
    replaced: dict[int, tuple[np.ndarray, np.ndarray, str]] = {}
    for name, adapter in adapters:
        for i, text, e, h in _new_rows(name, adapter, config):
            if i < len(tokens):
                if tokens[i] != text:
                    raise EdgeLoraError(
                        f"adapters {owner[i]!r} and {name!r} both define token id {config.vocab_size + i} "
                        f"({tokens[i]!r} vs {text!r})",
                        hint="use them in separate requests",
                    )
                if not (np.array_equal(embed[i], e) and np.array_equal(head[i], h)):
                    raise EdgeLoraError(
                        f"adapters {owner[i]!r} and {name!r} both define token {text!r} with different rows",
                        hint="use them in separate requests",
                    )
                continue
            if text in tokens:
                raise EdgeLoraError(
                    f"adapters {owner[tokens.index(text)]!r} and {name!r} define token {text!r} at "
                    "different ids",
                    hint="use them in separate requests",
                )
            tokens.append(text)
            embed.append(e)
            head.append(h)
            owner.append(name)
        for k, e, h in _replaced_rows(adapter, config):
            if k in replaced and not (
                np.array_equal(replaced[k][0], e) and np.array_equal(replaced[k][1], h)
            ):
                raise EdgeLoraError(
                    f"adapters {replaced[k][2]!r} and {name!r} both replace the rows of token id {k}, "
                    "differently",
                    hint="use them in separate requests",
                )
            replaced.setdefault(k, (e, h, name))
    order = sorted(replaced)
    embed += [replaced[k][0] for k in order]
    head += [replaced[k][1] for k in order]
    if not embed:
        return AddedVocab(config.vocab_size)
    return AddedVocab(config.vocab_size, tuple(tokens), np.stack(embed), np.stack(head), tuple(order))


def _new_rows(name: str, adapter: Adapter, config: ModelConfig):
    check_token_rows_fit(adapter, config)  # the checks adding ran (edge_lora/token_rows.py), once more here
    if not adapter.added_tokens:
        return []
    rows = adapter.embed_rows
    out = rows if config.tie_word_embeddings else adapter.head_rows
    return [
        (i, text, np.asarray(rows[i], np.float32), np.asarray(out[i], np.float32))
        for i, text in enumerate(adapter.added_tokens)
    ]


def _replaced_rows(adapter: Adapter, config: ModelConfig):
    if not adapter.replaced_tokens:
        return []
    rows = adapter.replaced_embed_rows
    out = rows if config.tie_word_embeddings else adapter.replaced_head_rows
    return [
        (int(k), np.asarray(rows[j], np.float32), np.asarray(out[j], np.float32))
        for j, k in enumerate(adapter.replaced_tokens)
    ]
