"""Importance of each linear layer's input columns: the mean squared activation over calibration text
(llama.cpp's "imatrix"). The 4-bit quantizers weigh each value's rounding error by it, so the columns
the model actually drives are kept precise.

Keyed by Hugging Face module name (``model.layers.0.self_attn.q_proj``, ``lm_head``), one float32
vector ``[in_features]`` each. Stored as safetensors beside the bundle (``importance.safetensors``):
the trainer's ``--base-quant`` needs the very same vectors to rebuild the device's weights bit for bit.
Collected by :mod:`edge_lora.train.importance` (a forward pass in PyTorch); numpy only here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_lora.errors import EdgeLoraError

FILE_NAME = "importance.safetensors"
SOURCE_KEY = "source"

# fused groups in the ONNX graph read one input: any member's vector serves the group
_GROUP_MEMBER = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}


@dataclass
class Importance:
    vectors: dict[str, np.ndarray]
    source: str = ""  # what text it was measured on, for the bundle and inspect
    tokens: int = 0
    _digest: str = field(default="", repr=False)

    def for_module(self, module: str) -> np.ndarray | None:
        """The vector of a module or fused group (``...qkv_proj`` -> its ``q_proj``), or None."""
        if module in self.vectors:
            return self.vectors[module]
        head, _, leaf = module.rpartition(".")
        member = _GROUP_MEMBER.get(leaf)
        if member is not None:
            return self.vectors.get(f"{head}.{member}")
        return None

    def for_tensor(self, tensor_name: str) -> np.ndarray | None:
        """By checkpoint tensor name (``...q_proj.weight``); the tied table takes the head's."""
        module = tensor_name.removesuffix(".weight")
        if module == "model.embed_tokens":
            module = "lm_head"
        return self.for_module(module)

    @property
    def digest(self) -> str:
        """SHA-256 over names and values: recorded in bundle.json, checked by the trainer."""
        if not self._digest:
            h = hashlib.sha256()
            for name in sorted(self.vectors):
                h.update(name.encode() + b"\0")
                h.update(np.ascontiguousarray(self.vectors[name], dtype="<f4").tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def save(self, path: Path) -> Path:
        from edge_lora.safetensors_file import save_tensors

        metadata = {SOURCE_KEY: self.source, "tokens": str(self.tokens), "sha256": self.digest}
        save_tensors(path, {k: v.astype(np.float32) for k, v in self.vectors.items()}, metadata)
        return Path(path)


def load_importance(path: Path) -> Importance:
    """An importance file, checked: float32 vectors of finite, non-negative values."""
    from edge_lora.safetensors_file import load_tensors

    path = Path(path)
    tensors, metadata = load_tensors(path)
    vectors = {}
    for name, value in tensors.items():
        value = np.asarray(value, dtype=np.float32)
        if value.ndim != 1 or not np.all(np.isfinite(value)) or np.any(value < 0):
            raise EdgeLoraError(
                f"importance vector {name!r} is not a finite non-negative vector",
                path=path,
                hint="make it again with `edge-lora export --calibration`",
            )
        vectors[name] = value
    return Importance(
        vectors, source=metadata.get(SOURCE_KEY, ""), tokens=int(metadata.get("tokens", 0) or 0)
    )


def block_importance(vector: np.ndarray | None, in_features: int, block_size: int) -> np.ndarray | None:
    """``[blocks, block_size]`` weights for a matrix's input columns (the last block zero-padded), or
    None; a vector of the wrong length is a bug in the caller, not bad input."""
    if vector is None:
        return None
    if vector.shape != (in_features,):
        raise ValueError(f"importance has {vector.shape[0]} columns, the weight {in_features}")
    blocks = -(-in_features // block_size)
    padded = np.zeros(blocks * block_size, dtype=np.float32)
    padded[:in_features] = vector
    return padded.reshape(blocks, block_size)


def load_base_importance(path: str | Path) -> Importance:
    """The importance a bundle's 4-bit bases were quantized with: ``path`` is the bundle folder (its
    bundle.json names the file) or an importance file."""
    import json

    path = Path(path)
    if not path.is_dir():
        return load_importance(path)
    try:
        entry = json.loads((path / "bundle.json").read_text(encoding="utf-8")).get("calibration")
    except (OSError, ValueError) as err:
        raise EdgeLoraError(
            f"cannot read bundle.json ({type(err).__name__})", path=path, hint="pass a bundle folder"
        ) from None
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        raise EdgeLoraError(
            "this bundle's base was quantized without calibration",
            path=path,
            hint="drop --base-importance (the trainer then builds the same uncalibrated base)",
        )
    importance = load_importance(path / Path(entry["file"]).name)
    if importance.digest != entry.get("sha256"):
        raise EdgeLoraError(
            "the importance file does not match bundle.json's hash",
            path=path / entry["file"],
            hint="export the bundle again",
        )
    return importance
