"""How the fast ONNX graph quantizes each base weight: the one per-tensor decision the exporter writes
and the trainer's ``--base-quant onnx-int4`` reproduces (so an adapter trains against the very weights
the device dequantizes).

Decoder linears are quantized per fused group (``names.lora_groups``: q/k/v as one matrix, gate/up as
another), symmetric, no zero points (MatMulNBits' faster kernel). A tied embedding table that
GatherBlockQuantized reads (and the head's MatMulNBits shares) is asymmetric, with zero points. Where
the hidden size does not fill whole blocks the tied table stays fp16 for lookups and the head gets its
own symmetric copy. numpy only.
"""

from __future__ import annotations

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.onnx_format.weight_quant import DEFAULT_BLOCK_SIZE, NBitsWeight, quantize_nbits

NBITS_QUANTS = {"int4": 4, "int8": 8}


def shares_quantized_table(config: ModelConfig, quant: str, block_size: int = DEFAULT_BLOCK_SIZE) -> bool:
    """Tied + MatMulNBits (the fast graph): the embedding gathers from the head's quantized weight."""
    return config.tie_word_embeddings and quant in NBITS_QUANTS and config.hidden_size % block_size == 0


def quantize_base_weight(
    name: str,
    weight: np.ndarray,
    quant: str,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    gathered: bool = False,
    importance: np.ndarray | None = None,
) -> NBitsWeight:
    """``W [N, K]`` of one fused group (``name``: ``model.layers.0.self_attn.qkv_proj``, ``lm_head``)
    or the tied table, as the fast graph stores it. ``gathered``: the tied table GatherBlockQuantized
    reads, which takes explicit zero points (asymmetric blocks). ``importance`` (``[K]``) weighs the
    symmetric 4-bit blocks' scale search (:mod:`edge_lora.importance`)."""
    return quantize_nbits(
        weight, NBITS_QUANTS[quant], block_size, symmetric=not gathered, importance=importance
    )
