"""Our adapter file as a GGUF LoRA that llama.cpp applies at run time (``llama_adapter_lora_init``).

Shared by the exporter and the runtime, which converts an adapter file on the fly when it is not
part of a bundle. Written with gguf-py's ``GGUFWriter`` and the metadata llama.cpp's own
``convert_lora_to_gguf.py`` writes; the writer writes the arrays it is handed, so an f32 adapter's
tensors are not copied. ``gguf`` is imported only when a file is written.

llama.cpp computes ``y = W x + s * (alpha / r) * B (A x)`` with ONE ``adapter.lora.alpha`` per file and
each tensor's own rank ``r``. Our adapters carry alpha per module and may use rsLoRA
(``alpha / sqrt(r)``), so every module's scale is expressed exactly: the file's alpha is a reference
value and each ``lora_b`` is multiplied by ``scale_m * r_m / alpha`` (1 when all modules agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.file_write import write_gguf
from edge_lora.gguf_format.names import FINGERPRINT_KEY, gguf_arch, gguf_module, to_gguf_rows
from edge_lora.gguf_format.quant import encode

if TYPE_CHECKING:
    import gguf

ADAPTER_DTYPES = ("f32", "f16", "q8_0")
UNSUPPORTED_HINT = (
    "merge it into the base on the host (edge-lora export --merge), or run it with the ONNX backend"
)


def merged_variant_reason(adapter: Adapter, config: ModelConfig) -> str | None:
    """Why stock llama.cpp's run-time LoRA cannot apply this adapter while a merged model can (the
    runtime then makes a merged variant when the adapter is added); None: a GGUF LoRA does it, or
    nothing can (an activated adapter acts on part of a prompt: no merge expresses it)."""
    if adapter.embed_rows is not None or adapter.head_rows is not None or adapter.activated:
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


def check_llamacpp_can_apply(adapter: Adapter, config: ModelConfig, path: Path | None = None) -> None:
    """Refuse, with the reason, adapters llama.cpp's run-time LoRA cannot express."""
    if adapter.dora:
        raise EdgeLoraError(
            "DoRA adapters rescale whole weight rows, which llama.cpp's run-time LoRA cannot do",
            path=path,
            hint=UNSUPPORTED_HINT,
        )
    # new tokens need no GGUF tensors: the runtime feeds their rows itself (runtime/llamacpp/lib.decode_added)
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
    # alpha such that llama.cpp's alpha / r_m equals our scale_m:
    # alpha_m for LoRA, alpha_m * sqrt(r_m) for rsLoRA
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

    ``durable=False`` writes straight to ``out_path``, in place, with no fsync: for a private scratch
    file that no crash needs to survive (the runtime's conversion on ``add_adapter``)."""
    if dtype not in ADAPTER_DTYPES:
        raise EdgeLoraError(
            f"unknown GGUF adapter dtype {dtype!r}", hint=f"choose one of {', '.join(ADAPTER_DTYPES)}"
        )
    adapter.check_fits(config)
    check_llamacpp_can_apply(adapter, config)
    if not adapter.modules and not adapter.added_tokens:
        raise EdgeLoraError("adapter holds no LoRA modules to write")
    # new tokens alone: a LoRA with no tensors (the runtime feeds their rows from the adapter file)
    return write_gguf(adapter_writer(adapter, config, dtype), out_path, "GGUF adapter", durable=durable)


def adapter_writer(adapter: Adapter, config: ModelConfig, dtype: str = "f32") -> gguf.GGUFWriter:
    """A ``GGUFWriter`` (no path yet) holding the adapter with the keys llama.cpp's
    ``convert_lora_to_gguf.py`` writes: ``general.type = adapter``, ``adapter.type = lora`` and
    ``adapter.lora.alpha`` as float32 (a float64 alpha aborts llama.cpp), then each target's
    ``lora_a`` / ``lora_b``, added as they are."""
    import gguf

    alpha, tensors = gguf_lora_tensors(adapter, config)
    writer = gguf.GGUFWriter(None, gguf_arch(config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_string(FINGERPRINT_KEY, adapter.base_fingerprint or "")  # an empty string is not written
    if adapter.activated:  # llama.cpp refuses any element type but uint32 (llama-adapter.cpp)
        writer.add_key_value(
            gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
            [int(i) for i in adapter.invocation_tokens],
            gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.UINT32,
        )
    for base_name, pair in tensors.items():
        for suffix, arr in zip(("lora_a", "lora_b"), pair):
            qtype = _tensor_type(arr, dtype)
            writer.add_tensor(f"{base_name}.{suffix}", encode(arr, qtype), raw_dtype=qtype)
    return writer


def _tensor_type(arr: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    """q8_0 only where rows fill whole 32-value blocks (a rank-16 lora_b does not), else f16."""
    from gguf import GGMLQuantizationType as T

    if dtype == "f32":
        return T.F32
    return T.Q8_0 if dtype == "q8_0" and arr.shape[-1] % 32 == 0 else T.F16
