"""A llama.cpp model (``llama_model``: the weights) and the LoRA adapters loaded on it."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

from edge_lora.errors import EdgeLoraError
from runtime.llamacpp.lib import GpuDevice, default_extra_bufts, llama_cpp

LOAD_MODE_NONE, LOAD_MODE_MMAP = 0, 1  # enum llama_load_mode


class Model:
    """A loaded llama_model (weights only); free() releases it and every adapter loaded on it."""

    def __init__(
        self,
        path: Path,
        *,
        devices: Sequence[GpuDevice] = (),
        n_gpu_layers: int = 0,
        use_extra_bufts: bool | None = None,
        use_mmap: bool | None = None,
    ) -> None:
        """``devices``: the GPUs to offload ``n_gpu_layers`` layers to; none keeps every tensor and
        every op on the CPU, even in a GPU build (llama.cpp would otherwise use all it finds).
        ``use_mmap=None``: map the file unless the CPU's extra buffer types repack the weights; a
        repacked tensor is copied out of the mapping, whose touched pages then stay resident as a
        second copy of the weights (reading the file instead leaves one)."""
        lib = llama_cpp()
        self.path = Path(path)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers) if devices else 0
        # a NULL-terminated ggml_backend_dev_t list, kept alive with the model
        self._devices = (ctypes.c_void_p * (len(devices) + 1))(*[d.ptr for d in devices], None)
        params.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        params.use_extra_bufts = default_extra_bufts() if use_extra_bufts is None else bool(use_extra_bufts)
        self.use_extra_bufts = bool(params.use_extra_bufts)
        self.use_mmap = not (self.use_extra_bufts and not devices) if use_mmap is None else bool(use_mmap)
        # llama.h's load_mode (use_mmap is gone from llama_model_params; setting it on the ctypes struct
        # did nothing): LLAMA_LOAD_MODE_MMAP maps the file, LLAMA_LOAD_MODE_NONE reads it
        params.load_mode = LOAD_MODE_MMAP if self.use_mmap else LOAD_MODE_NONE
        self.ptr = lib.llama_model_load_from_file(os.fspath(self.path).encode(), params)
        if not self.ptr:
            raise EdgeLoraError(
                "llama.cpp could not load this GGUF model",
                path=self.path,
                hint="the file is corrupt, truncated or from a newer format; re-export the bundle",
            )
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def meta(self, key: str) -> str | None:
        lib = llama_cpp()
        buf = ctypes.create_string_buffer(512)
        n = lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def load_lora(self, path: Path) -> object:
        lib = llama_cpp()
        ptr = lib.llama_adapter_lora_init(self.ptr, os.fspath(path).encode())
        if not ptr:  # a NULL pointer: llama.cpp rejected the file (wrong base, bad tensors)
            raise EdgeLoraError(
                "llama.cpp could not load this LoRA adapter",
                path=path,
                hint="wrong base model? re-export the adapter for this bundle",
            )
        return ptr

    def free_lora(self, ptr: object) -> None:
        if ptr and self.ptr:
            llama_cpp().llama_adapter_lora_free(ptr)

    def free(self) -> None:
        if self.ptr:
            llama_cpp().llama_model_free(self.ptr)
            self.ptr = None
