"""The two quickstart tasks and their exact-match scoring.

Both work on short words spelled out letter by letter (``c a t``), so every letter is one
token of a byte-level BPE and the tasks are about letters, not about the tokenizer. The shipped
base was pretrained on copying spelled words and on single-letter facts (``next: c = d``,
``flip: c = x``) but never on applying a fact to every letter of a word: it scores ~0 on both
tasks (a word the task would leave unchanged never counts), and an adapter teaches the composition.

    shift:  c a t = -> " d b u"     (each letter one step on, z wraps to a)
    mirror: c a t = -> " x z g"     (each letter mirrored in the alphabet, a <-> z)
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


def _mirror(word: str) -> str:
    return "".join(LETTERS[25 - LETTERS.index(c)] for c in word)


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


TASKS = {
    "shift": Task("shift", "shift", _shift, "move each letter one step on (z -> a)"),
    "mirror": Task("mirror", "mirror", _mirror, "mirror each letter in the alphabet (a <-> z, b <-> y)"),
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
