"""Calibration for the 4-bit exports: which text the importance of each weight column is measured on.

``edge-lora export --calibration``:

- ``auto`` (default): when the export makes a 4-bit base and PyTorch is installed, Python's own help
  texts (``pydoc_data.topics``, in every CPython: :mod:`edge_lora.app.real_text`); without PyTorch the
  scales are still searched, weighted by the weights alone (a note says so).
- ``none``: no calibration.
- a ``.jsonl`` file in the trainer's formats (``text``, ``prompt``/``completion`` or ``messages``; the
  user's own training data is the best calibration), or any other file as plain UTF-8 text.
- an ``importance.safetensors`` (or a bundle folder holding one) measured before: reused as it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from edge_lora.errors import EdgeLoraError
from edge_lora.importance import Importance, load_base_importance
from edge_lora.model_dir import ModelDir

CALIBRATION_TOKENS = 4096  # 16 windows of 256: llama.cpp's imatrix settles within a few thousand tokens
SEARCHED_QUANTS = {"q4_0", "q5_0", "int4"}  # the exports whose scale search importance weighs


def export_importance(
    spec: str,
    model_dir: str | os.PathLike,
    quants: list[str],
    tokens: int = CALIBRATION_TOKENS,
    say: Callable[[str], None] = print,
) -> Importance | None:
    """The importance an export should use for ``spec`` (see the module doc), or None."""
    if spec == "none" or (spec == "auto" and not SEARCHED_QUANTS.intersection(quants)):
        return None
    path = Path(spec)
    if spec != "auto" and (path.is_dir() or path.suffix == ".safetensors"):
        return load_base_importance(path)  # a bundle's is checked against its bundle.json hash
    try:
        from edge_lora.train.importance import collect_importance
    except ImportError:
        if spec != "auto":
            raise EdgeLoraError(
                "calibration from text needs PyTorch", path=path, hint="pip install 'edge-lora[train]'"
            ) from None
        say(
            "note: no PyTorch, so 4-bit scales are searched without calibration "
            "(pip install 'edge-lora[train]')"
        )
        return None
    md = ModelDir(model_dir)
    text, source = _text(spec)
    windows = _windows(md, text, tokens, source)
    say(f"calibrating on {sum(len(w) for w in windows)} tokens of {source}")
    return collect_importance(md, windows, source=source)


def _text(spec: str) -> tuple[str, str]:
    if spec == "auto":
        from edge_lora.app.real_text import calibration_text

        return calibration_text(), "pydoc_data.topics"
    from edge_lora.app.real_text import read_text

    path = Path(spec)
    raw = read_text(path, "the calibration text", "pass a UTF-8 text or JSONL file, 'auto' or 'none'")
    return (_jsonl_text(raw, path) if path.suffix == ".jsonl" else raw), path.name


def _jsonl_text(raw: str, path: Path) -> str:
    """The text of every record: ``text``, ``prompt`` + ``completion``, or the ``messages``' contents."""
    parts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise EdgeLoraError(
                f"line {number} is not JSON", path=path, hint="one JSON object a line"
            ) from None
        if not isinstance(record, dict):
            raise EdgeLoraError(
                f"line {number} is not a JSON object", path=path, hint="one JSON object a line"
            )
        if isinstance(record.get("text"), str):
            parts.append(record["text"])
        elif isinstance(record.get("prompt"), str):
            parts.append(record["prompt"] + str(record.get("completion", "")))
        elif isinstance(record.get("messages"), list):
            parts.extend(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
        else:
            raise EdgeLoraError(
                f"line {number} has no text, prompt or messages", path=path, hint="use the trainer's formats"
            )
    return "\n\n".join(parts)


def _windows(md: ModelDir, text: str, tokens: int, source: str) -> list[list[int]]:
    from edge_lora.app.real_text import WINDOW, token_ids, windows

    ids = token_ids(md.tokenizer_path, text)
    if len(ids) < WINDOW:
        raise EdgeLoraError(
            f"the calibration text is too short ({len(ids)} tokens, at least {WINDOW} needed)",
            path=source,
            hint="pass more text, or --calibration auto",
        )
    return windows(ids, WINDOW, max_windows=max(1, tokens // WINDOW))
