"""Our adapter file as a GGUF LoRA that llama.cpp applies at run time (``llama_adapter_lora_init``).

In the core package because the runtime converts an adapter file on the fly when it is not part of
a bundle. That conversion sits on ``add_adapter``'s path, so the file is written here directly (a
GGUF LoRA is a short header and the tensors' bytes) without importing ``gguf`` (~40 ms) or copying
the tensors; only q8_0 needs ``gguf``'s quantizer.

llama.cpp computes ``y = W x + s * (alpha / r) * B (A x)`` with ONE ``adapter.lora.alpha`` per file and
each tensor's own rank ``r``. Our adapters carry alpha per module and may use rsLoRA
(``alpha / sqrt(r)``), so every module's scale is expressed exactly: the file's alpha is a reference
value and each ``lora_b`` is multiplied by ``scale_m * r_m / alpha`` (1 when all modules agree).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.atomic import atomic_path
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.names import gguf_arch, gguf_module, to_gguf_rows

ADAPTER_DTYPES = ("f32", "f16", "q8_0")
FINGERPRINT_KEY = "edge_lora.base_fingerprint"

# GGUF v3 as llama.cpp reads it: gguf-py's values (gguf.GGUF_MAGIC, GGUFValueType, GGMLQuantizationType,
# Keys), spelled out so the runtime needs no gguf import; tests/test_fast_add.py checks they agree
GGUF_MAGIC = 0x46554747
GGUF_VERSION = 3
GGUF_ALIGNMENT = 32
VALUE_FLOAT32, VALUE_STRING = 6, 8
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
KEY_ARCHITECTURE, KEY_TYPE = "general.architecture", "general.type"
KEY_ADAPTER_TYPE, KEY_LORA_ALPHA = "adapter.type", "adapter.lora.alpha"
UNSUPPORTED_HINT = (
    "merge it into the base on the host (edge-lora export --merge), or run it with the ONNX backend"
)


def merged_variant_reason(adapter: Adapter, config: ModelConfig) -> str | None:
    """Why stock llama.cpp's run-time LoRA cannot apply this adapter while a merged model can (the
    runtime then makes a merged variant when the adapter is added); None: a GGUF LoRA does it."""
    if adapter.embed_rows is not None or adapter.head_rows is not None:
        return None  # new tokens: not a merge's business
    if adapter.dora:
        return "DoRA rescales whole weight rows, which llama.cpp's run-time LoRA cannot express"
    if (
        config.tie_word_embeddings
        and "lm_head" in adapter.modules
        and "model.embed_tokens" not in adapter.modules
    ):
        return (
            "LoRA on the tied output head: llama.cpp's tied output is the token_embd tensor, which "
            "has no output.weight for a LoRA to name"
        )
    return None


def check_llamacpp_can_apply(adapter: Adapter, config: ModelConfig, path=None) -> None:
    """Refuse, with the reason, adapters llama.cpp's run-time LoRA cannot express."""
    if adapter.dora:
        raise EdgeLoraError(
            "DoRA adapters rescale whole weight rows, which llama.cpp's run-time LoRA cannot do",
            path=path,
            hint=UNSUPPORTED_HINT,
        )
    # new tokens need no GGUF tensors: the runtime feeds their rows itself (runtime/llamacpp_lib.decode_added)
    if config.tie_word_embeddings and any(m in ("lm_head", "model.embed_tokens") for m in adapter.modules):
        raise EdgeLoraError(
            "LoRA on the output layer of a tied-embedding base: llama.cpp rejects it (the output "
            "is the embedding table)",
            path=path,
            hint=UNSUPPORTED_HINT,
        )


def gguf_lora_tensors(
    adapter: Adapter, config: ModelConfig
) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The file's alpha and ``{gguf base tensor: (lora_a [r,in], lora_b [out,r])}`` in float32.

    Arrays that need no change (float32, contiguous, no rescale or permutation) are the adapter's own."""
    # alpha such that llama.cpp's alpha / r_m equals our scale_m: alpha_m for LoRA, alpha_m * sqrt(r_m) for rsLoRA
    effective = {m: adapter.scale(m) * w.rank for m, w in adapter.modules.items()}
    alpha = next(iter(effective.values()), 1.0)
    tensors = {}
    for module, w in adapter.modules.items():
        b = np.ascontiguousarray(w.b, dtype=np.float32)
        if effective[module] != alpha:
            b = b * np.float32(effective[module] / alpha)
        b = to_gguf_rows(config, module, b)
        tensors[f"{gguf_module(module)}.weight"] = (
            np.ascontiguousarray(w.a, dtype=np.float32),
            np.ascontiguousarray(b),
        )
    return float(alpha), tensors


def export_gguf_adapter(
    adapter: Adapter, config: ModelConfig, out_path: Path, dtype: str = "f32", durable: bool = True
) -> Path:
    """Write ``adapter`` as a GGUF LoRA for the base described by ``config``; returns ``out_path``.

    ``durable=False`` writes straight to ``out_path`` with no fsync: for a private scratch file that
    no crash needs to survive (the runtime's conversion on ``add_adapter``)."""
    if dtype not in ADAPTER_DTYPES:
        raise EdgeLoraError(
            f"unknown GGUF adapter dtype {dtype!r}", hint=f"choose one of {', '.join(ADAPTER_DTYPES)}"
        )
    adapter.check_fits(config)
    check_llamacpp_can_apply(adapter, config)
    if not adapter.modules and not adapter.added_tokens:
        raise EdgeLoraError("adapter holds no LoRA modules to write")
    # new tokens alone: a LoRA with no tensors (the runtime feeds their rows from the adapter file)
    alpha, tensors = gguf_lora_tensors(adapter, config)
    metadata = [
        (KEY_ARCHITECTURE, VALUE_STRING, gguf_arch(config)),
        (KEY_TYPE, VALUE_STRING, "adapter"),
        (KEY_ADAPTER_TYPE, VALUE_STRING, "lora"),
        (KEY_LORA_ALPHA, VALUE_FLOAT32, alpha),
    ]  # FLOAT64 alpha aborts llama.cpp
    if adapter.base_fingerprint:
        metadata.append((FINGERPRINT_KEY, VALUE_STRING, adapter.base_fingerprint))
    named = [
        (f"{base_name}.{suffix}", _encoded(arr, dtype))
        for base_name, pair in tensors.items()
        for suffix, arr in zip(("lora_a", "lora_b"), pair)
    ]
    out_path = Path(out_path)
    if not durable:
        _write_gguf_file(out_path, metadata, named)
        return out_path
    with atomic_path(out_path) as tmp:
        _write_gguf_file(tmp, metadata, named)
    return out_path


def _encoded(arr: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    """(ggml type name, data): q8_0 only where rows fill whole 32-value blocks (a rank-16 lora_b does not), else f16."""
    if dtype == "f32":
        return "f32", arr
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        from gguf import GGMLQuantizationType, quants

        return "q8_0", quants.quantize(arr, GGMLQuantizationType.Q8_0)
    return "f16", arr.astype(np.float16)


def _write_gguf_file(
    path: Path, metadata: list[tuple[str, int, object]], tensors: list[tuple[str, tuple[str, np.ndarray]]]
) -> None:
    """Header, metadata, tensor table, then each tensor's bytes at a 32-byte aligned offset.

    An existing file is overwritten in place and cut to length, not truncated first: rewriting
    cached pages costs a third of allocating new ones (the runtime reuses one scratch file)."""
    head = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata))]
    for key, kind, value in metadata:
        head.append(_string(key) + struct.pack("<I", kind))
        head.append(_string(value) if kind == VALUE_STRING else struct.pack("<f", value))
    offset = 0
    for name, (qtype, data) in tensors:
        # ggml lists dimensions innermost first; a quantized row's element count is its block count times 32
        dims = _logical_shape(qtype, data)[::-1]
        head.append(
            _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, GGML_TYPES[qtype], offset)
        )
        offset += _padded(data.nbytes)
    header = b"".join(head)
    header += bytes(_padded(len(header)) - len(header))
    try:
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666), "wb") as f:
            f.write(header)
            for _, (_, data) in tensors:
                f.write(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
                f.write(bytes(_padded(data.nbytes) - data.nbytes))
            f.truncate()
    except OSError as err:
        raise EdgeLoraError(
            f"cannot write the GGUF adapter ({err.strerror})", path=path, hint="check free disk space"
        ) from None


def _logical_shape(qtype: str, data: np.ndarray) -> tuple[int, ...]:
    if qtype != "q8_0":
        return data.shape
    return (
        *data.shape[:-1],
        data.shape[-1] // 34 * 32,
    )  # q8_0: 34 bytes (an f16 scale, 32 int8) per 32 values


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _padded(n: int) -> int:
    return n + (-n % GGUF_ALIGNMENT)
