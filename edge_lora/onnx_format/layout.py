"""``onnx_layout.json``: what the exporter records beside model.onnx for the runtime, read and checked."""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format.names import LAYOUT_FILE, LAYOUT_FORMAT, LAYOUT_VERSION, OLDEST_LAYOUT_VERSION


def read_layout(model_path: str | os.PathLike) -> dict:
    """The exporter's ``onnx_layout.json`` beside ``model_path``, checked for format and version."""
    path = Path(model_path).parent / LAYOUT_FILE
    if not path.is_file():
        raise EdgeLoraError(
            f"no {LAYOUT_FILE} beside the ONNX model",
            path=path.parent,
            hint="re-export the bundle with edge-lora",
        )
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeLoraError(
            f"{LAYOUT_FILE} is not valid JSON", path=path, hint="re-export the bundle"
        ) from None
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        raise EdgeLoraError(f"{LAYOUT_FILE} is not an edge-lora ONNX layout", path=path)
    if isinstance(layout.get("version"), int) and layout["version"] < OLDEST_LAYOUT_VERSION:
        raise EdgeLoraError(
            f"ONNX layout version {layout['version']} has one LoRA input pair per module, which this "
            "edge-lora no longer feeds",
            path=path,
            hint="re-export the bundle with this edge-lora",
        )
    if not isinstance(layout.get("version"), int) or layout["version"] > LAYOUT_VERSION:
        raise EdgeLoraError(
            f"ONNX layout version {layout.get('version')!r} is newer than this edge-lora reads",
            path=path,
            hint="upgrade edge-lora",
        )
    return layout
