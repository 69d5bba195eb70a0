"""One error type for everything a user can get wrong.

Messages follow llama.cpp's habit: name the file, say what is wrong, give a hint.
The CLI prints ``str(err)`` on one line and exits non-zero.
"""

from __future__ import annotations

import os


class EdgeLoraError(Exception):
    def __init__(self, message: str, *, path: str | os.PathLike | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" (hint: {self.hint})"
        return " ".join(text.split("\n"))


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of a foreign library's error message (they run to many lines), or its type."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
