"""How the fast ONNX graph quantizes each base weight: the one per-tensor decision the exporter writes
and the trainer's ``--base-quant onnx-int4`` reproduces (so an adapter trains against the very weights
the device dequantizes).

Decoder linears are quantized per fused group (``names.lora_groups``: q/k/v as one matrix, gate/up as
another), symmetric, no zero points (MatMulNBits' faster kernel). A tied embedding table that
GatherBlockQuantized reads (and the head's MatMulNBits shares) is asymmetric, with zero points, in
blocks of 16 at 4 bits. Every block's scale (and zero point) is searched for the least error weighted
by the calibration's importance (edge_lora/block_search.py). Where
the hidden size does not fill whole blocks the tied table stays fp16 for lookups and the head gets its
own symmetric copy. numpy only.
"""

from __future__ import annotations

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.onnx_format.weight_quant import DEFAULT_BLOCK_SIZE, NBitsWeight, quantize_nbits

NBITS_QUANTS = {"int4": 4, "int8": 8}
# the 4-bit tied table (every logit reads it) in finer blocks: on SmolLM2-135M, calibrated, perplexity
# 1.12x -> 1.09x full precision for +4 MB (docs/quantization.md)
TABLE_BLOCK_SIZE = 16


def shares_quantized_table(config: ModelConfig, quant: str, block_size: int = DEFAULT_BLOCK_SIZE) -> bool:
    """Tied + MatMulNBits (the fast graph): the embedding gathers from the head's quantized weight."""
    return (
        config.tie_word_embeddings
        and quant in NBITS_QUANTS
        and config.hidden_size % max(block_size, TABLE_BLOCK_SIZE) == 0
    )


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
    reads, which takes explicit zero points (asymmetric blocks) and, at 4 bits, blocks of
    ``TABLE_BLOCK_SIZE``. ``importance`` (``[K]``) weighs the blocks' search
    (:mod:`edge_lora.importance`)."""
    bits = NBITS_QUANTS[quant]
    if gathered and bits == 4:
        block_size = TABLE_BLOCK_SIZE
    return quantize_nbits(weight, bits, block_size, symmetric=not gathered, importance=importance)
