"""Our adapter file as a GGUF LoRA that llama.cpp applies at run time (``llama_adapter_lora_init``).

In the core package because the runtime converts an adapter file on the fly when it is not part of
a bundle; imports ``gguf`` lazily.

llama.cpp computes ``y = W x + s * (alpha / r) * B (A x)`` with ONE ``adapter.lora.alpha`` per file and
each tensor's own rank ``r``. Our adapters carry alpha per module and may use rsLoRA
(``alpha / sqrt(r)``), so every module's scale is expressed exactly: the file's alpha is a reference
value and each ``lora_b`` is multiplied by ``scale_m * r_m / alpha`` (1 when all modules agree).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .adapter import Adapter
from .atomic import atomic_path
from .config import ModelConfig
from .errors import EdgeLoraError
from .gguf_names import gguf_arch, gguf_module, to_gguf_rows
from .gguf_quant import encode, write_gguf

ADAPTER_DTYPES = ("f32", "f16", "q8_0")
FINGERPRINT_KEY = "edge_lora.base_fingerprint"
UNSUPPORTED_HINT = "merge it into the base on the host (edge-lora export --merge), or run it with the ONNX backend"


def check_llamacpp_can_apply(adapter: Adapter, config: ModelConfig, path=None) -> None:
    """Refuse, with the reason, adapters llama.cpp's run-time LoRA cannot express."""
    if adapter.dora:
        raise EdgeLoraError("DoRA adapters rescale whole weight rows, which llama.cpp's run-time LoRA cannot do",
                            path=path, hint=UNSUPPORTED_HINT)
    if adapter.embed_rows is not None or adapter.head_rows is not None:
        raise EdgeLoraError("this adapter adds tokens; llama.cpp cannot grow the vocabulary of a loaded model",
                            path=path, hint=UNSUPPORTED_HINT)
    if config.tie_word_embeddings and any(m in ("lm_head", "model.embed_tokens") for m in adapter.modules):
        raise EdgeLoraError("LoRA on the output layer of a tied-embedding base: llama.cpp rejects it (the output "
                            "is the embedding table)", path=path, hint=UNSUPPORTED_HINT)


def gguf_lora_tensors(adapter: Adapter, config: ModelConfig) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The file's alpha and ``{gguf base tensor: (lora_a [r,in], lora_b [out,r])}`` in float32."""
    # alpha such that llama.cpp's alpha / r_m equals our scale_m: alpha_m for LoRA, alpha_m * sqrt(r_m) for rsLoRA
    effective = {m: adapter.scale(m) * w.rank for m, w in adapter.modules.items()}
    alpha = next(iter(effective.values()), 1.0)
    tensors = {}
    for module, w in adapter.modules.items():
        b = w.b.astype(np.float32) * np.float32(effective[module] / alpha)
        b = to_gguf_rows(config, module, b)
        tensors[f"{gguf_module(module)}.weight"] = (np.ascontiguousarray(w.a, dtype=np.float32), np.ascontiguousarray(b))
    return float(alpha), tensors


def export_gguf_adapter(adapter: Adapter, config: ModelConfig, out_path: Path, dtype: str = "f32") -> Path:
    """Write ``adapter`` as a GGUF LoRA for the base described by ``config``; returns ``out_path``."""
    import gguf

    if dtype not in ADAPTER_DTYPES:
        raise EdgeLoraError(f"unknown GGUF adapter dtype {dtype!r}", hint=f"choose one of {', '.join(ADAPTER_DTYPES)}")
    adapter.check_fits(config)
    check_llamacpp_can_apply(adapter, config)
    if not adapter.modules:
        raise EdgeLoraError("adapter holds no LoRA modules to write")
    alpha, tensors = gguf_lora_tensors(adapter, config)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(os.fspath(tmp), gguf_arch(config))
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)  # FLOAT64 here aborts llama.cpp
        if adapter.base_fingerprint:
            writer.add_string(FINGERPRINT_KEY, adapter.base_fingerprint)
        for base_name, (a, b) in tensors.items():
            for suffix, arr in (("lora_a", a), ("lora_b", b)):
                qtype = _adapter_type(arr, dtype)
                writer.add_tensor(f"{base_name}.{suffix}", encode(arr, qtype), raw_dtype=qtype)
        write_gguf(writer, out_path, "GGUF adapter")
    return out_path


def _adapter_type(arr: np.ndarray, dtype: str):
    """q8_0 only where rows fill whole 32-value blocks (a rank-16 lora_b does not): else f16."""
    from gguf import GGMLQuantizationType as T

    if dtype == "f32":
        return T.F32
    if dtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16

