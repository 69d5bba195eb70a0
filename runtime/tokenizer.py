"""Tokenizer for the device: the ``tokenizers`` library on the bundle's tokenizer.json.

:meth:`Tokenizer.with_added` gives a view that also knows an adapter set's new tokens (ids
``base_vocab + i``, see :mod:`runtime.new_tokens`): a copy of the base tokenizer with them added
as plain (non-special, unnormalized) tokens, its ids mapped to ours. The base tokenizer itself is
never changed, so requests without those adapters keep the base vocabulary.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from edge_lora.errors import EdgeLoraError
from edge_lora.token_rows import check_new_token_strings


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(os.fspath(path))
        except Exception as err:  # the Rust side raises a bare Exception on bad JSON
            raise EdgeLoraError(
                f"cannot read tokenizer ({str(err).splitlines()[0][:120]})",
                path=path,
                hint="the tokenizer.json is corrupt or not a fast-tokenizer file",
            ) from None
        self._views: dict[tuple, Tokenizer] = {}
        self._views_lock = threading.Lock()
        self._to_ours: dict[int, int] = {}  # a view's tokenizers id -> our id for its new tokens
        self._to_theirs: dict[int, int] = {}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return [self._to_ours.get(i, i) for i in ids] if self._to_ours else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [self._to_theirs.get(int(i), int(i)) for i in ids] if self._to_theirs else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        found = self._tok.token_to_id(token)
        return self._to_ours.get(found, found) if found is not None else None

    def with_added(self, tokens: tuple[str, ...], first_id: int) -> Tokenizer:
        """This tokenizer plus ``tokens`` at ids ``first_id, first_id + 1, ...`` (cached per set)."""
        tokens = tuple(tokens)
        if not tokens:
            return self
        key = (tokens, int(first_id))
        with self._views_lock:
            view = self._views.get(key)
        if view is not None:
            return view
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _Tokenizer

        check_new_token_strings(tokens, self._tok.token_to_id)  # adding refused these already
        view = Tokenizer.__new__(Tokenizer)
        view._tok = _Tokenizer.from_str(self._tok.to_str())
        view._tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens])
        view._views, view._views_lock = {}, threading.Lock()
        view._to_ours = {view._tok.token_to_id(t): int(first_id) + i for i, t in enumerate(tokens)}
        view._to_theirs = {ours: theirs for theirs, ours in view._to_ours.items()}
        with self._views_lock:
            if len(self._views) >= 16:  # sets come and go with adapters: keep the recent ones
                self._views.pop(next(iter(self._views)))
            return self._views.setdefault(key, view)


class StreamDecoder:
    """Turns a growing list of ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta
