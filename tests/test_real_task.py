"""The real task's data (edge_lora.app.real_task): passages of Debian's licence texts, split the same way
every time, classes balanced, no passage naming its licence, held-out text never seen in training,
every line in the trainer's format."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from edge_lora.app import real_task
from edge_lora.errors import EdgeLoraError


def test_split_is_deterministic_balanced_and_disjoint(tmp_path):
    task = real_task.make_task(tmp_path / "a")
    again = real_task.make_task(tmp_path / "b")
    assert task.train.read_bytes() == again.train.read_bytes()
    assert task.held_out.read_bytes() == again.held_out.read_bytes()
    train, held = real_task.read_examples(task.train), real_task.read_examples(task.held_out)
    assert (len(train), len(held)) == (task.counts["train"], task.counts["held_out"])
    for split in (train, held):
        counts = Counter(r["completion"] for r in split)
        assert set(counts) == {f" {label}" for label in real_task.LICENCES}
        assert len(set(counts.values())) == 1  # balanced: chance is 1/4
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len(held) >= 80  # one held-out passage is at most 1.25 points


def test_passages_never_name_a_licence(tmp_path):
    task = real_task.make_task(tmp_path)
    for line in task.train.read_text().splitlines() + task.held_out.read_text().splitlines():
        record = json.loads(line)
        passage = record["prompt"][1 : record["prompt"].index('"\n')].lower()
        # whole words or word starts ("example" holds "mpl" and stays)
        assert not any(re.search(rf"\b{re.escape(name)}", passage) for name in real_task.NAMES), passage


def test_trainer_reads_the_task(tmp_path, model_dirs):
    from edge_lora.train.data import Formatter, build_examples, read_jsonl

    task = real_task.make_task(tmp_path)
    examples, stats = build_examples(read_jsonl(task.train), Formatter(model_dirs["smollm"]), 256)
    assert len(examples) == task.counts["train"] and stats["dropped"] == 0
    assert all(e.targets >= 1 for e in examples)  # the label (and end of sequence) are the targets


def test_missing_licence_text_is_one_line(tmp_path):
    with pytest.raises(EdgeLoraError, match="cannot read the licence text") as err:
        real_task.make_task(tmp_path / "out", source_dir=tmp_path / "nowhere")
    assert "base-files" in str(err.value)
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_labels_sharing_a_first_token_are_refused():
    with pytest.raises(EdgeLoraError, match="share a first token"):
        real_task.label_ids(lambda s: [ord(s[1])], ["Apache", "Artistic"])
