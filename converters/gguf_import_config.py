"""The model config of a GGUF base, as the ``config.json`` of a Hugging Face folder.

llama.cpp's "llama" architecture covers Llama 2/3, Mistral and SmolLM; "qwen2" is Qwen2. A Mistral
file says "llama" too: like transformers' own GGUF loader we call it Mistral when its name says so
(with no sliding window, since llama.cpp runs it with full attention, and so does the folder). The
vocabulary size and tied embeddings come from the tensors themselves. Rope scaling: "linear" from
its keys; Llama 3's from the ``rope_freqs`` tensor, whose per-frequency divisors are all a GGUF
keeps of it: the llama3 parameters are recovered from them and checked to give the same divisors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.file_read import field_value

if TYPE_CHECKING:
    import gguf

# GGUF architecture -> the Hugging Face architectures it may be
SUPPORTED = ("llama", "qwen2")
_HINT = "supported GGUF architectures: llama (Llama 2/3, Mistral, SmolLM), qwen2"


def model_config(reader: gguf.GGUFReader, path: Path) -> tuple[ModelConfig, dict]:
    """(our ModelConfig, the config.json dict) of the GGUF base at ``path``."""
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise EdgeLoraError(f"GGUF architecture {arch!r} cannot be imported", path=path, hint=_HINT)
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise EdgeLoraError("GGUF has no token_embd.weight", path=path, hint="is this a base model?")
    hidden_size, vocab_size = (int(d) for d in names["token_embd.weight"].shape[:2])

    def key(name: str, default: object = None, kind: type = int) -> object:
        value = field_value(reader, f"{arch}.{name}", default)
        if value is None:
            raise EdgeLoraError(
                f"GGUF has no {arch}.{name}", path=path, hint="the file is not a complete base"
            )
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise EdgeLoraError(f"GGUF key {arch}.{name} is not a number", path=path) from None

    layers = key("block_count")
    if not 0 < layers <= len(names) // 9:  # a layer is at least nine tensors: no count beyond the file's
        raise EdgeLoraError(
            f"{arch}.block_count {layers} does not match the file's {len(names)} tensors",
            path=path,
            hint="the file is corrupt or incomplete",
        )
    heads = key("attention.head_count")
    head_dim = key("attention.key_length", hidden_size // max(heads, 1))
    if key("rope.dimension_count", head_dim) != head_dim:
        raise EdgeLoraError("partial rotary embeddings cannot be imported", path=path, hint=_HINT)
    raw = {
        "architectures": [_hf_architecture(reader, arch)],
        "vocab_size": vocab_size,
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": key("rope.freq_base", 10000.0, kind=float),
        "max_position_embeddings": key("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
    }
    if raw["hidden_size"] != hidden_size:
        raise EdgeLoraError(
            f"token_embd.weight has width {hidden_size} but {arch}.embedding_length is {raw['hidden_size']}",
            path=path,
            hint="the file is corrupt",
        )
    raw["rope_scaling"] = _rope_scaling(reader, arch, raw, path)
    raw.update(_special_ids(reader))
    if raw["architectures"] == ["MistralForCausalLM"]:
        raw["sliding_window"] = None  # llama.cpp attends to the whole context
    config = ModelConfig.from_dict(raw, path=path)
    hf = config.to_hf_dict()
    hf["pad_token_id"] = raw.get("pad_token_id")
    if config.model_type == "mistral":
        hf["sliding_window"] = None
    if config.model_type == "qwen2":
        hf["use_sliding_window"] = False
    return config, hf


def _hf_architecture(reader: gguf.GGUFReader, arch: str) -> str:
    if arch == "qwen2":
        return "Qwen2ForCausalLM"
    name = " ".join(str(field_value(reader, k, "")) for k in ("general.name", "general.basename"))
    return "MistralForCausalLM" if "mistral" in name.lower() else "LlamaForCausalLM"


def _special_ids(reader: gguf.GGUFReader) -> dict:
    ids = {
        "bos_token_id": field_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field_value(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field_value(reader, "tokenizer.ggml.padding_token_id"),
    }
    return {k: int(v) for k, v in ids.items() if v is not None}


def _rope_scaling(reader: gguf.GGUFReader, arch: str, raw: dict, path: Path) -> dict | None:
    kind = field_value(reader, f"{arch}.rope.scaling.type")
    factor = field_value(reader, f"{arch}.rope.scaling.factor")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if kind not in (None, "none"):
            raise EdgeLoraError(f"rope_freqs with rope scaling {kind!r} cannot be imported", path=path)
        from gguf.quants import dequantize

        divisors = np.asarray(dequantize(freqs.data, freqs.tensor_type), dtype=np.float64).reshape(-1)
        return llama3_scaling(divisors, raw["rope_theta"], raw["head_dim"], path)
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear" and isinstance(factor, (int, float)) and factor > 0:
        return {"rope_type": "linear", "factor": float(factor)}
    raise EdgeLoraError(
        f"rope scaling {kind!r} (factor {factor!r}) cannot be imported",
        path=path,
        hint="supported: linear, llama3",
    )


def llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict | None:
    """Llama 3 rope parameters that give exactly these per-frequency divisors (llama.cpp's rope_freqs).

    Between its two wavelength bounds llama3 blends by ``s = a / wavelength - b`` (``a = old_ctx /
    (high - low)``, ``b = low / (high - low)``); divisors are 1 above (s >= 1) and ``factor`` below
    (s <= 0). Only (factor, a, b) matter, so low_freq_factor is taken as 1 (Llama 3's own value);
    a and b come from the blended frequencies, or from the bounds when fewer than two are blended.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if divisors.shape != inv.shape or not np.all(np.isfinite(divisors)) or divisors.min() < 1 - 1e-6:
        raise EdgeLoraError("rope_freqs.weight is not a llama3 rope scaling", path=path)
    factor = float(divisors.max())
    x = inv / (2 * math.pi)  # 1 / wavelength
    if factor <= 1 + 1e-6:  # nothing scaled
        return None
    if divisors.min() >= factor * (1 - 1e-6):  # everything scaled alike: that is linear scaling
        return {"rope_type": "linear", "factor": factor}
    s = (1 / divisors - 1 / factor) / (1 - 1 / factor)
    medium = (s > 1e-6) & (s < 1 - 1e-6)
    a, b = _blend_line(x, s, medium)
    exact = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(1.0 + 1.0 / b),
        "original_max_position_embeddings": float(a / b),
    }
    rounded = dict(exact)  # Llama 3's own values are whole numbers: prefer them where they fit as well
    for name in ("factor", "high_freq_factor", "original_max_position_embeddings"):
        rounded[name] = float(round(exact[name]))
    rounded["original_max_position_embeddings"] = int(rounded["original_max_position_embeddings"])
    for params in (rounded, exact):
        model = ModelConfig("LlamaForCausalLM", 1, head_dim, 1, 1, 1, 1, head_dim, rope_theta=theta)
        model.rope_scaling = params
        if np.allclose(inv / model.rope_inv_freq(), divisors, rtol=1e-5, atol=0):
            return params
    raise EdgeLoraError("rope_freqs.weight does not follow llama3 rope scaling", path=path)


def _blend_line(x: np.ndarray, s: np.ndarray, medium: np.ndarray) -> tuple[float, float]:
    """(a, b) with ``s = a x - b`` on the blended points, s <= 0 / s >= 1 on the others."""
    low = x[~medium & (s <= 0.5)]  # divided by factor: long wavelengths, small x
    high = x[~medium & (s > 0.5)]  # untouched: short wavelengths, large x
    if medium.sum() >= 2:
        a, intercept = np.polyfit(x[medium], s[medium], 1)
        return float(a), float(-intercept)
    if medium.sum() == 1:
        xm, sm = float(x[medium][0]), float(s[medium][0])
        slopes = [1e-12]
        if low.size:
            slopes.append(sm / (xm - low.max()))
        if high.size:
            slopes.append((1 - sm) / (high.min() - xm))
        a = 1.25 * max(slopes)  # a margin: the neighbours stay clearly scaled / untouched
        return a, a * xm - sm
    a = 1.0 / (high.min() - low.max())  # a step: blend between the last scaled and the first untouched
    return a, a * low.max()
