"""The new tokens (and replaced base rows) of adapters combined into one: their union, or a clash.

The rule is the runtime's for a stacked set (runtime/new_tokens.py): an adapter's new token ``i`` has id
``base_vocab + i``, so two adapters agree only where every position they both define holds the same
string with the same rows, and a replaced base id must get the same rows from each. Rows are taken as
they are, whatever an input's weight: a token is defined or not, as in a stack. The combined adapter
then gives a request the vocabulary the stacked set gave it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError

_HINT = "combine adapters whose new tokens agree, or use them in separate requests"


@dataclass
class TokenUnion:
    tokens: list[str] = field(default_factory=list)
    embed: list[np.ndarray] = field(default_factory=list)
    head: list[np.ndarray | None] = field(default_factory=list)
    owner: list[str] = field(default_factory=list)
    replaced: dict[int, tuple[np.ndarray, np.ndarray | None, str]] = field(default_factory=dict)

    def add(self, name: str, adapter: Adapter) -> None:
        for i, text in enumerate(adapter.added_tokens):
            e, h = _row(adapter.embed_rows, i), _row(adapter.head_rows, i)
            if i < len(self.tokens):
                if self.tokens[i] != text:
                    raise EdgeLoraError(
                        f"adapters {self.owner[i]!r} and {name!r} both define new token {i} "
                        f"({self.tokens[i]!r} vs {text!r})",
                        hint=_HINT,
                    )
                if not (_same(self.embed[i], e) and _same(self.head[i], h)):
                    raise EdgeLoraError(
                        f"adapters {self.owner[i]!r} and {name!r} both define token {text!r} "
                        "with different rows",
                        hint=_HINT,
                    )
                continue
            if text in self.tokens:
                raise EdgeLoraError(
                    f"adapters {self.owner[self.tokens.index(text)]!r} and {name!r} define token {text!r} "
                    "at different ids",
                    hint=_HINT,
                )
            self.tokens.append(text)
            self.embed.append(e)
            self.head.append(h)
            self.owner.append(name)
        for j, k in enumerate(adapter.replaced_tokens):
            e, h = _row(adapter.replaced_embed_rows, j), _row(adapter.replaced_head_rows, j)
            if k in self.replaced and not (_same(self.replaced[k][0], e) and _same(self.replaced[k][1], h)):
                raise EdgeLoraError(
                    f"adapters {self.replaced[k][2]!r} and {name!r} both replace the rows of token id {k}, "
                    "differently",
                    hint=_HINT,
                )
            self.replaced.setdefault(k, (e, h, name))

    def apply_to(self, adapter: Adapter) -> None:
        """Give ``adapter`` the union's tokens and rows."""
        adapter.added_tokens = list(self.tokens)
        adapter.embed_rows = np.stack(self.embed) if self.tokens else None
        adapter.head_rows = _stack(self.head) if self.tokens else None
        order = sorted(self.replaced)
        adapter.replaced_tokens = order
        adapter.replaced_embed_rows = np.stack([self.replaced[k][0] for k in order]) if order else None
        adapter.replaced_head_rows = _stack([self.replaced[k][1] for k in order]) if order else None


def _row(rows: np.ndarray | None, i: int) -> np.ndarray | None:
    return None if rows is None else np.asarray(rows[i], np.float32)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _stack(rows: list[np.ndarray | None]) -> np.ndarray | None:
    """Output rows exist on untied bases only: all inputs have them or none does."""
    if any(r is None for r in rows):
        if all(r is None for r in rows):
            return None
        raise EdgeLoraError(
            "some inputs carry output-layer rows for their new tokens and others do not",
            hint="were they made for the same base? an untied base needs lm_head rows for every new token",
        )
    return np.stack(rows)


def union_tokens(named: list[tuple[str, Adapter]]) -> TokenUnion:
    union = TokenUnion()
    for name, adapter in named:
        union.add(name, adapter)
    return union
