"""The quickstart's adapters, their examples and exact-match scoring.

Every task works on short words spelled out letter by letter (``c a t``), so every letter is one
token of a byte-level BPE and the tasks are about letters, not about the tokenizer. The shipped
base was pretrained on copying and spelling words, on first/last letters and on single-letter
facts (``next: c = d``, ``flip: c = x``), but never on applying a fact to every letter of a word
nor on counting: it scores ~0 on every task (a word the task would leave unchanged never counts).

    shift:  shift: c a t =  -> " d b u"   each letter one step on (z wraps to a)
    mirror: mirror: c a t = -> " x z g"   each letter mirrored in the alphabet (a <-> z)
    count:  count: c a t =  -> "<n3>"     the word's length, as a token the adapter adds

and one style adapter, trained only on what the base already does:

    period: copy: c a t =   -> " c a t."  every answer ends with a full stop

``period`` touches only the last layer (where the next token is chosen) and is trained on the
base's own tasks, so it composes with a task adapter: shift and period stacked answer
``shift: c a t =`` with ``" d b u."``. shift and mirror conflict (both rewrite every letter):
stacked, neither survives, which the quickstart reports as well.
"""

from __future__ import annotations

import random
import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

LETTERS = string.ascii_lowercase
END = "\n"  # every answer ends with a newline: the stop string at inference
PERIOD = "."


def spell(word: str) -> str:
    return " ".join(word)


def random_word(rng: random.Random, min_len: int = 3, max_len: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))


def word_split(word: str) -> str:
    return "eval" if zlib.crc32(word.encode()) % 5 == 0 else "train"


@dataclass(frozen=True)
class Task:
    """A word -> answer task. ``answer`` gives the answer's letters (spelled in the target), or
    ``target`` gives the whole target text; ``new_tokens`` are tokens its adapter adds to the
    vocabulary; ``targets`` the modules its LoRA trains (PEFT-style spec)."""

    name: str
    prefix: str
    description: str
    answer: Callable[[str], str] | None = None
    target_text: Callable[[str], str] | None = None
    new_tokens: tuple[str, ...] = ()
    targets: str = "all-linear"

    def target_modules(self, num_layers: int) -> str:
        return self.targets

    def prompt(self, word: str) -> str:
        return f"{self.prefix}: {spell(word)} ="

    def target(self, word: str) -> str:
        return self.target_text(word) if self.target_text else " " + spell(self.answer(word))

    def accepts(self, word: str) -> bool:
        return self.answer is None or self.answer(word) != word  # a copy must never count as a right answer

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


@dataclass(frozen=True)
class StyleTask:
    """A format adapter: the base's own tasks (``families``) with every answer ending in ``suffix``."""

    name: str
    description: str
    suffix: str
    families: tuple[str, ...] = ("copy", "spell", "first", "last")
    new_tokens: tuple[str, ...] = field(default=())

    def target_modules(self, num_layers: int) -> str:
        """The last layer only: a format decided where the next token is chosen, the letters left to
        the task adapter."""
        return rf"model\.layers\.{num_layers - 1}\..*"

    def examples(self, n: int, split: str, seed: int = 0) -> list[tuple[str, str]]:
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: set[tuple[str, str]] = set()
        out = []
        while len(out) < n:
            word, family = random_word(rng), rng.choice(self.families)
            if (word, family) in seen or word_split(word) != split:
                continue
            seen.add((word, family))
            prompt, target = BASE_FAMILIES[family](word)
            out.append((prompt, target + self.suffix))
        return out

    def unstyled(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """This style's items with the plain answers the base gives (what it is right on before the style)."""
        return [(prompt, target.removesuffix(self.suffix)) for prompt, target in items]

    def styled(self, items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Another task's items with this style applied to their answers (what a stacked set should say)."""
        return [(prompt, target + self.suffix) for prompt, target in items]


def _mirror(word: str) -> str:
    return "".join(LETTERS[25 - LETTERS.index(c)] for c in word)


def _shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def length_token(n: int) -> str:
    return f"<n{n}>"


# what the base was pretrained on (examples/make_default_model.py): the style adapter's training data
BASE_FAMILIES: dict[str, Callable[[str], tuple[str, str]]] = {
    "copy": lambda w: (f"copy: {spell(w)} =", " " + spell(w)),
    "spell": lambda w: (f"spell: {w} =", " " + spell(w)),
    "first": lambda w: (f"first: {spell(w)} =", " " + w[0]),
    "last": lambda w: (f"last: {spell(w)} =", " " + w[-1]),
}

TASKS = {
    "shift": Task("shift", "shift", "move each letter one step on (z -> a)", answer=_shift),
    "mirror": Task(
        "mirror", "mirror", "mirror each letter in the alphabet (a <-> z, b <-> y)", answer=_mirror
    ),
    "count": Task(
        "count",
        "count",
        "the word's length as a new token (<n3>, <n4>, <n5>)",
        target_text=lambda w: length_token(len(w)),
        new_tokens=tuple(length_token(n) for n in (3, 4, 5)),
    ),
}
STYLES = {"period": StyleTask("period", "end every answer with a full stop", PERIOD)}


def exact_match(generated: str, target: str) -> bool:
    """The answer up to the first newline, compared with the target; surrounding spaces ignored."""
    return generated.split(END, 1)[0].strip() == target.strip()


def score(generate: Callable[[str], str], items: list[tuple[str, str]]) -> float:
    """Percent of items whose generated answer matches exactly."""
    if not items:
        return 0.0
    hits = sum(exact_match(generate(prompt), target) for prompt, target in items)
    return 100.0 * hits / len(items)
