"""Tokenizer for the device: the ``tokenizers`` library on the bundle's tokenizer.json."""

from __future__ import annotations

import os

from edge_lora.errors import EdgeLoraError


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(os.fspath(path))
        except Exception as err:  # the Rust side raises a bare Exception on bad JSON
            raise EdgeLoraError(f"cannot read tokenizer ({str(err).splitlines()[0][:120]})", path=path,
                                hint="the tokenizer.json is corrupt or not a fast-tokenizer file") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


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
        delta, self.text = text[len(self.text):], text
        return delta
