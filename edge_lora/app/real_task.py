"""A real task from real text: which software licence is this passage from?

Source: the licence texts Debian ships in ``/usr/share/common-licenses`` (package ``base-files``, on every
Debian and Ubuntu system): the Apache License 2.0, the Mozilla Public License 2.0, the GNU GPL version 3
and the (Perl) Artistic License. Each text is cut into passages of ``WORDS`` consecutive words; passages
that name a licence (``Apache``, ``Mozilla``, ``GNU``, ``Artistic``, ...) are dropped, so the answer has
to come from each licence's own wording ("Covered Software", "Derivative Works", "convey", "Package").
Every class keeps the same number of passages (the shortest text sets it) and every ``HELD_OUT_EVERY``-th
passage of a class is held out: a deterministic split of unseen text from the same documents, with
balanced classes (chance = 1 / 4).

Examples are ``{"prompt", "completion"}`` JSONL lines in the trainer's format
(:mod:`edge_lora.train.data`); the completion is the label word with a leading space. Scoring on the
device (:func:`accuracy`) takes, through ``runtime.load``'s engine, the logits after the prompt and
picks the label whose first token scores highest: exact match of the answer among the four.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.atomic import atomic_write_text
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from runtime.engine import Engine

SOURCE_DIR = Path("/usr/share/common-licenses")
SOURCE = "Debian base-files: /usr/share/common-licenses/{Apache-2.0, MPL-2.0, GPL-3, Artistic}"
LICENCES = {"Apache": "Apache-2.0", "MPL": "MPL-2.0", "GPL": "GPL-3", "Artistic": "Artistic"}
WORDS = 10
HELD_OUT_EVERY = 4
# words that give a licence's name away (compared lower-case, as whole words or word starts)
NAMES = ("apache", "mozilla", "mpl", "gnu", "gpl", "lgpl", "agpl", "artistic", "perl", "free software")
PROMPT = '"{passage}"\nLicence:'  # short: the training cost is per token


@dataclass
class RealTask:
    train: Path  # JSONL for --data
    held_out: Path  # JSONL, scored by accuracy()
    labels: list[str]
    counts: dict[str, int]  # examples per split
    source: str = SOURCE


def passages(text: str, words: int = WORDS) -> list[str]:
    """Consecutive ``words``-word passages of ``text`` (whitespace folded) that name no licence."""
    tokens = text.split()
    cut = [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in NAMES) + r")", re.IGNORECASE)
    return [p for p in cut if not pattern.search(p)]


def examples(source_dir: str | os.PathLike = SOURCE_DIR, words: int = WORDS) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` example lists, classes balanced and interleaved, deterministic."""
    source_dir = Path(source_dir)
    by_label = {}
    for label, name in LICENCES.items():
        path = source_dir / name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise EdgeLoraError(
                f"cannot read the licence text: {err.strerror}",
                path=path,
                hint="it comes with Debian's base-files package",
            ) from None
        by_label[label] = passages(text, words)
    size = min(len(p) for p in by_label.values())
    if size < 2 * HELD_OUT_EVERY:
        raise EdgeLoraError(f"too few passages ({size}) in a licence text", path=source_dir)
    train, held_out = [], []
    for i in range(size):  # round robin over the labels: a prefix of either list stays balanced
        for label, found in by_label.items():
            record = {"prompt": PROMPT.format(passage=found[i]), "completion": f" {label}"}
            (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(record)
    return train, held_out


def make_task(out_dir: str | os.PathLike, source_dir: str | os.PathLike = SOURCE_DIR) -> RealTask:
    """Write ``train.jsonl`` and ``held_out.jsonl`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = examples(source_dir)
    files = {}
    for name, records in (("train", train), ("held_out", held_out)):
        files[name] = out_dir / f"{name}.jsonl"
        atomic_write_text(files[name], "".join(json.dumps(r) + "\n" for r in records))
    return RealTask(
        files["train"], files["held_out"], list(LICENCES), {"train": len(train), "held_out": len(held_out)}
    )


def read_examples(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def label_ids(encode: callable, labels: list[str]) -> list[int]:
    """The first token of each ``" label"`` completion; they must differ to be told apart."""
    ids = [encode(f" {label}")[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise EdgeLoraError(f"the labels {labels} share a first token", hint="choose distinct label words")
    return ids


def accuracy(
    engine: Engine,
    records: list[dict],
    adapters: dict[str, float] | None = None,
    labels: list[str] | None = None,
) -> float:
    """Exact-match accuracy on the device: the label whose first token the engine's logits after the
    prompt rank highest, against the record's completion."""
    labels = labels or list(LICENCES)
    tok = engine.tokenizer_for(adapters)
    ids = label_ids(lambda s: tok.encode(s, add_special_tokens=False), labels)
    right = 0
    for record in records:
        prompt = tok.encode(record["prompt"], add_special_tokens=True)
        last = engine.logits(prompt, adapters=adapters)[-1]
        picked = labels[int(max(range(len(ids)), key=lambda i: last[ids[i]]))]
        right += f" {picked}" == record["completion"]
    return right / max(1, len(records))
