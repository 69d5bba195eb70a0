"""How the GGUF base exporter stores each weight: its GGUF name, its rows in llama.cpp's order and its
tensor type. The one per-tensor decision the exporter writes and the trainer's ``--base-quant q4_0``
reproduces (so an adapter trains against the very weights llama.cpp dequantizes). numpy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.gguf_format.names import gguf_tensor, to_gguf_rows
from edge_lora.gguf_format.quant import tensor_type

if TYPE_CHECKING:
    import gguf


def is_output(config: ModelConfig, target: str) -> bool:
    """The matrix every logit reads: ``output``, or ``token_embd`` on a tied base."""
    return target == "output.weight" or (config.tie_word_embeddings and target == "token_embd.weight")


def base_tensor(
    config: ModelConfig, name: str, array: np.ndarray, quant: str
) -> tuple[str, np.ndarray, gguf.GGMLQuantizationType]:
    """``(gguf name, array with q/k rows in llama.cpp's order, tensor type)`` of one checkpoint tensor."""
    rows = to_gguf_rows(config, name.rsplit(".", 1)[0], array)
    target = gguf_tensor(name)
    return target, rows, tensor_type(target, rows.shape, quant, is_output=is_output(config, target))
