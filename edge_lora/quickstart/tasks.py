"""The two quickstart tasks and their exact-match scoring.

Both work on short words spelled out letter by letter (``c a t``), so every letter is one
token of a byte-level BPE and the tasks are about positions and letters, not about the
tokenizer. The shipped base model was pretrained on copying and spelling such words: it
answers both prompts by copying, which scores ~0 (palindromes are left out of ``reverse``).

    reverse: c a t = -> " t a c"
    shift:   c a t = -> " d b u"     (Caesar shift by one, z wraps to a)
"""

from __future__ import annotations

import random
import string
import zlib
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
END = "\n"  # every answer ends with a newline: the stop string at inference


def spell(word: str) -> str:
    return " ".join(word)


def random_word(rng: random.Random, min_len: int = 3, max_len: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))


@dataclass(frozen=True)
class Task:
    name: str
    prefix: str
    answer: Callable[[str], str]
    description: str

    def prompt(self, word: str) -> str:
        return f"{self.prefix}: {spell(word)} ="

    def target(self, word: str) -> str:
        return " " + spell(self.answer(word))

    def accepts(self, word: str) -> bool:
        return self.answer(word) != word  # a copy must never count as a right answer

    def examples(self, n: int, split: str, seed: int = 0) -> list[tuple[str, str]]:
        """``n`` distinct (prompt, target) pairs of ``split`` ("train" or "eval").

        A word belongs to one split only (by its CRC), so no evaluation word is ever trained on.
        """
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: set[str] = set()
        out = []
        while len(out) < n:
            word = random_word(rng)
            if word in seen or not self.accepts(word) or word_split(word) != split:
                continue
            seen.add(word)
            out.append((self.prompt(word), self.target(word)))
        return out


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


TASKS = {
    "reverse": Task("reverse", "reverse", lambda w: w[::-1], "spell a word backwards"),
    "shift": Task("shift", "shift", _shift, "move each letter one step on (z -> a)"),
}


def word_split(word: str) -> str:
    return "eval" if zlib.crc32(word.encode()) % 5 == 0 else "train"


def exact_match(generated: str, target: str) -> bool:
    """The answer up to the first newline, compared with the target; surrounding spaces ignored."""
    return generated.split(END, 1)[0].strip() == target.strip()


def score(generate: Callable[[str], str], items: list[tuple[str, str]]) -> float:
    """Percent of items whose generated answer matches exactly."""
    if not items:
        return 0.0
    hits = sum(exact_match(generate(prompt), target) for prompt, target in items)
    return 100.0 * hits / len(items)
