"""Real models the quickstart knows by name: ``edge-lora quickstart --model NAME``.

Each name maps to a fetcher that returns a Hugging Face model folder, cached after the first call, so
more models can follow with one line each. ``--model`` still takes a folder: a value that is an
existing path, or looks like one, is a folder; a bare word must be a name in the table.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_lora.errors import EdgeLoraError


@dataclass(frozen=True)
class NamedModel:
    name: str
    title: str  # what the report calls it
    source: str  # where its weights come from, for the report
    fetch: Callable[[], Path]  # the model folder, fetched and imported the first time


def _smollm2() -> Path:
    from edge_lora.app.real_model import smollm2_model_dir

    return Path(smollm2_model_dir())


def _smollm2_source() -> str:
    from edge_lora.app.real_model import GGUF_NAME, WHEEL

    return f"{GGUF_NAME} from the PyPI wheel {WHEEL}, imported with import-gguf"


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel("smollm2", "SmolLM2-135M-Instruct", _smollm2_source(), _smollm2),
}


def named_model(value: str | os.PathLike | None) -> NamedModel | None:
    """The named real model ``value`` means, or None when it is a folder (or not given).

    A bare word that is neither a known name nor an existing path is refused in one line."""
    if value is None:
        return None
    text = str(value)
    looks_like_path = os.sep in text or (os.altsep or os.sep) in text or text.startswith(".")
    if Path(text).exists() or looks_like_path:
        return None  # a folder the user chose, even one that shares a name with the table
    if text.lower() in NAMED_MODELS:
        return NAMED_MODELS[text.lower()]
    raise EdgeLoraError(
        f"--model {text!r} is neither a model folder nor a known model name",
        hint=f"name one of: {', '.join(NAMED_MODELS)}; or pass a Hugging Face model directory",
    )
