"""Fold adapters into a Hugging Face model directory: the work behind `edge-lora merge`.

The merged directory is an ordinary model: export it for a zero-overhead single-task bundle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from converters.bundle_adapter_files import load_adapter
from edge_lora.atomic import atomic_write_bytes, atomic_write_text
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.safetensors_file import save_tensors

COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def merge_into_model_dir(
    model_dir: str | os.PathLike, adapters: list[tuple[str, float]], out: str | os.PathLike
) -> Path:
    """Write ``out`` = the base with each (adapter path, scale) folded in, as float32 safetensors."""
    md = ModelDir(model_dir)
    out = Path(out)
    if out.resolve() == md.path.resolve():
        raise EdgeLoraError("--out must differ from the base model directory", path=out)
    loaded = [(load_adapter(path, md.config, md.fingerprint), scale, path) for path, scale in adapters]
    for adapter, _, path in loaded:
        if adapter.token_rows:
            raise EdgeLoraError(
                "adapters with new tokens or token rows cannot be merged into a plain model",
                path=path,
                hint="export a bundle with the adapter instead",
            )
    tensors = {name: md.get(name) for name in md.tensor_names()}
    for adapter, scale, _ in loaded:
        for module in adapter.modules:
            key = f"{module}.weight"
            if key not in tensors:
                raise EdgeLoraError(f"the base has no weight {key!r} to merge into", path=md.path)
            tensors[key] = adapter.merged_weight(module, tensors[key], scale)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", tensors, {"format": "pt"})
    raw = json.loads((md.path / "config.json").read_text(encoding="utf-8"))
    raw.pop("torch_dtype", None)
    raw.pop("dtype", None)
    atomic_write_text(out / "config.json", json.dumps(raw, indent=2) + "\n")
    for name in COPIED_FILES:
        if (md.path / name).is_file():
            atomic_write_bytes(out / name, (md.path / name).read_bytes())  # a kill never leaves a torn copy
    return out
