"""A Hugging Face model directory, read without torch.

``config.json``, one or several ``*.safetensors`` shards (with ``model.safetensors.index.json``
or without), ``tokenizer.json`` and optionally ``tokenizer_config.json``. Pickled
``*.bin`` checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import SafetensorsFile

FINGERPRINT_PREFIX = "sha256:"


class ModelDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise EdgeLoraError(
                "not a model directory",
                path=self.path,
                hint="pass a folder with config.json and *.safetensors",
            )
        self.config = ModelConfig.from_model_dir(self.path)

    @cached_property
    def _files(self) -> dict[str, SafetensorsFile]:
        """tensor name -> the shard that holds it."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                raise EdgeLoraError("bad safetensors index (no weight_map)", path=index) from None
            shards = sorted(set(weight_map.values()))
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            pickled = sorted(p.name for p in self.path.glob("*.bin")) + sorted(
                p.name for p in self.path.glob("*.pt*")
            )
            hint = (
                "convert it to safetensors on a trusted machine; pickled weights are never loaded"
                if pickled
                else "export the model with safe_serialization=True"
            )
            raise EdgeLoraError("no *.safetensors weights", path=self.path, hint=hint)
        files = {}
        for shard in shards:
            shard_path = self.path / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise EdgeLoraError(f"index points outside the model directory: {shard}", path=index)
            st = SafetensorsFile(shard_path)
            for name in st.keys():
                files[name] = st
        return files

    def tensor_names(self) -> list[str]:
        return sorted(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> np.ndarray:
        """A tensor as float32 (or its stored integer type)."""
        if name not in self._files:
            raise EdgeLoraError(f"tensor {name!r} not found in the weights", path=self.path)
        arr = self._files[name].get(name)
        return arr.astype(np.float32) if arr.dtype in (np.float16, np.float64) else arr

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from its shard's header (no data read)."""
        if name not in self._files:
            raise EdgeLoraError(f"tensor {name!r} not found in the weights", path=self.path)
        return tuple(self._files[name].tensors[name].shape)

    def read_float32(self, name: str) -> np.ndarray:
        """A tensor as a fresh float32 array: the library reads it with plain reads (``pread``), so no
        memory map of the shard lingers in the process's resident set (float32 needs no conversion)."""
        return np.ascontiguousarray(self.get(name), dtype=np.float32)

    def release(self) -> None:
        """Close the shards (they are reopened, and their headers checked again, on the next read)."""
        self.__dict__.pop("_files", None)

    def weight_dtype(self) -> str:
        name = "model.embed_tokens.weight"
        return self._files[name].tensors[name].dtype if name in self._files else "F32"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over every tensor's name, dtype, shape and bytes, in name order.

        Computed once at export or training time and stored in the bundle and in each adapter;
        the device compares strings and never needs the float weights to check a match. The bytes are
        those stored (bf16 too), streamed through one small buffer.
        """
        digest = hashlib.sha256()
        for name in self.tensor_names():
            st = self._files[name]
            info = st.tensors[name]
            digest.update(f"{name}|{info.dtype}|{list(info.shape)}\n".encode())
            for piece in st.raw_chunks(name):
                digest.update(piece)
        return FINGERPRINT_PREFIX + digest.hexdigest()

    @property
    def tokenizer_path(self) -> Path:
        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise EdgeLoraError(
                "no tokenizer.json",
                path=self.path,
                hint="save the tokenizer with a fast (Rust) tokenizer: tokenizer.save_pretrained(dir)",
            )
        return path

    @property
    def tokenizer_config(self) -> dict:
        path = self.path / "tokenizer_config.json"
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EdgeLoraError("tokenizer_config.json is not valid JSON", path=path) from None
        return raw if isinstance(raw, dict) else {}
