"""GGUF names for our canonical (Hugging Face) tensor names, and llama.cpp's rotary permutation.

Shared by the GGUF converter and the llama.cpp runtime (which converts adapters on the fly and
merges adapters into a GGUF), so both agree on every name. numpy only.
"""

from __future__ import annotations

import re

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError

# our model_type -> llama.cpp architecture; Mistral is a Llama to llama.cpp
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# decoder-layer module (after "model.layers.N.") -> llama.cpp tensor stem (after "blk.N.")
LAYER_MODULES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_MODULES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, as per-frequency divisors
# our own metadata key, in a base GGUF and in GGUF adapters: lets the runtime check they belong together
FINGERPRINT_KEY = "edge_lora.base_fingerprint"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_arch(config: ModelConfig) -> str:
    return GGUF_ARCH[config.model_type]


def gguf_module(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``; ``lm_head`` -> ``output``."""
    if module in GLOBAL_MODULES:
        return GLOBAL_MODULES[module]
    match = _LAYER.match(module)
    if match and match[2] in LAYER_MODULES:
        return f"blk.{match[1]}.{LAYER_MODULES[match[2]]}"
    raise EdgeLoraError(
        f"no GGUF name for module {module!r}", hint="only Llama-family decoder modules map to GGUF"
    )


def gguf_tensor(name: str) -> str:
    """A weight or bias name: ``model.layers.0.self_attn.q_proj.bias`` -> ``blk.0.attn_q.bias``."""
    module, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise EdgeLoraError(f"no GGUF name for tensor {name!r}")
    return f"{gguf_module(module)}.{kind}"


def rotary_heads(config: ModelConfig, module: str) -> int | None:
    """How many heads to permute for this module's output rows, or None if no permutation.

    llama.cpp's "llama" architecture rotates interleaved pairs (GPT-J style) while Hugging Face
    rotates halves, so its converter reorders the q/k output rows; Qwen2 uses the NeoX (halves)
    layout in llama.cpp and needs nothing.
    """
    if gguf_arch(config) != "llama":
        return None
    if module.endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if module.endswith("self_attn.k_proj"):
        return config.num_key_value_heads
    return None


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows (axis 0) of a q/k weight, bias or lora_B as llama.cpp's converter does."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise EdgeLoraError(f"cannot apply the rotary permutation: {out} rows for {n_head} heads")
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def to_gguf_rows(config: ModelConfig, module: str, rows: np.ndarray) -> np.ndarray:
    """Rows of ``module``'s output (weight, bias or lora_B) in llama.cpp's order."""
    heads = rotary_heads(config, module)
    return rows if heads is None else permute_rows(rows, heads)


def llama3_rope_factors(config: ModelConfig) -> np.ndarray | None:
    """``rope_freqs.weight`` for llama3 rope scaling: llama.cpp divides each frequency by it."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return None
    base = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    return (base / config.rope_inv_freq()).astype(np.float32)


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rows`: llama.cpp's q/k row order back to Hugging Face's."""
    out = rows.shape[0]
    if out % (2 * n_head):
        raise EdgeLoraError(f"cannot undo the rotary permutation: {out} rows for {n_head} heads")
    return rows.reshape(n_head, out // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def from_gguf_rows(config: ModelConfig, module: str, rows: np.ndarray) -> np.ndarray:
    """Rows of ``module``'s output (weight or bias) read from a GGUF, in Hugging Face's order."""
    heads = rotary_heads(config, module)
    return rows if heads is None else unpermute_rows(rows, heads)


_GLOBAL_TENSORS = {f"{stem}.weight": f"{module}.weight" for module, stem in GLOBAL_MODULES.items()}
_LAYER_STEMS = {stem: module for module, stem in LAYER_MODULES.items()}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_tensor(gguf_name: str) -> str | None:
    """A GGUF tensor's Hugging Face name (``blk.0.attn_q.bias`` -> ``model.layers.0.self_attn.q_proj.bias``),
    or None for a tensor with no place in a Llama-family checkpoint (``rope_freqs``, fused or MoE tensors)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK.match(gguf_name)
    if match and match[2] in _LAYER_STEMS:
        return f"model.layers.{match[1]}.{_LAYER_STEMS[match[2]]}.{match[3]}"
    return None
