"""The storage dtype of an exported adapter (``edge-lora export --adapter-dtype fp32|fp16|int8``).

An adapter's values are rounded to the chosen dtype once, and every file of it in a bundle is
written from those rounded values, so both backends run the same adapter:

fp32  as trained.
fp16  every LoRA tensor in float16 (the source ``.safetensors`` and the GGUF hold float16).
int8  llama.cpp's q8_0 (blocks of 32 values along a row, one float16 scale each) for the tensors
      whose rows fill whole blocks (``lora_A [r, in]``), float16 for the rest (``lora_B [out, r]``
      at a rank below 32), as llama.cpp's own ``convert_lora_to_gguf.py --outtype q8_0`` stores it.
      The source ``.safetensors`` holds the rounded values in float16 (adapter files hold floats).

The ``.onnx_adapter`` is always written in the graph's LoRA input dtype (the layout's
``lora_dtype``, float32 by default): ONNX Runtime binds its tensors as graph inputs as they are,
and on the CPU a narrower input costs a Cast per group per token (measured slower than float32, see
docs/adapter-format.md), so the dtype sets its values' precision, not its width.
DoRA magnitudes and new-token rows stay float32 (they are few and scale whole weight rows).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError

ADAPTER_DTYPES = ("fp32", "fp16", "int8")
GGUF_DTYPE = {"fp32": "f32", "fp16": "f16", "int8": "q8_0"}
SOURCE_DTYPE = {"fp32": np.float32, "fp16": np.float16, "int8": np.float16}
Q8_BLOCK = 32


def check_adapter_dtype(dtype: str) -> str:
    if dtype not in ADAPTER_DTYPES:
        raise EdgeLoraError(
            f"unknown adapter dtype {dtype!r}", hint=f"choose one of {', '.join(ADAPTER_DTYPES)}"
        )
    return dtype


def q8_0_roundtrip(x: np.ndarray) -> np.ndarray:
    """``x`` through q8_0 and back (rows must hold whole 32-value blocks), bit for bit as gguf-py
    (and ggml's reference) quantize: the float32 scale rounds, halves away from zero, and the
    stored scale is its float16."""
    blocks = np.asarray(x, np.float32).reshape(-1, Q8_BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        scaled = blocks * np.where(d == 0, 0, 1 / d)
    whole = np.floor(np.abs(scaled))
    q = np.sign(scaled) * (whole + np.floor(2 * (np.abs(scaled) - whole)))
    return (q.astype(np.int8).astype(np.float32) * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def round_tensor(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp32":
        return x
    if dtype == "int8" and x.shape[-1] % Q8_BLOCK == 0:
        # as the float16 source stores them: every file then holds the same numbers (the GGUF's q8_0
        # of these gives back the same integers, its scales within a float16 ulp)
        return q8_0_roundtrip(x).astype(np.float16).astype(np.float32)
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def rounded(adapter: Adapter, dtype: str) -> Adapter:
    """A copy of ``adapter`` whose LoRA tensors hold the values ``dtype`` stores (float32 arrays)."""
    check_adapter_dtype(dtype)
    if dtype == "fp32":
        return adapter
    modules = {
        m: replace(w, a=round_tensor(w.a, dtype), b=round_tensor(w.b, dtype))
        for m, w in adapter.modules.items()
    }
    return replace(adapter, modules=modules)
