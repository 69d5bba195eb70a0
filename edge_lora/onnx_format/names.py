"""Names shared by the ONNX exporter and the ONNX runtime backend (feeds: :mod:`.lora_feeds`).

Graph I/O follows onnxruntime-genai's decoder convention so that it loads our folder as it is:
``input_ids``, ``attention_mask``, ``past_key_values.N.key|value`` in, ``logits``,
``present.N.key|value`` out.

Every fused weight group (``lora_groups``: q/k/v as ``...self_attn.qkv_proj``, gate/up as
``...mlp.gate_up_proj``, every other linear alone) has one LoRA side path ``x @ A^T @ B^T`` whose two
tensors are overridable initializers (graph inputs with a rank-0 default): ``<group>.lora_A.T
[in, R]`` holds every module's A^T side by side along the rank, ``<group>.lora_B.T [R, out]`` is
block-diagonal (each module's B^T rows sit in that module's output columns, zeros elsewhere). One
pair per group instead of per module keeps the graph at three LoRA nodes per group, since per-node
overhead is most of what an empty or low-rank side path costs at decode (the price is B's zeros,
see docs/backend-notes.md). The adapter's ``.safetensors`` keeps PEFT's per-module ``[r, in]`` /
``[out, r]``; its ``.onnx_adapter`` holds these grouped feeds, with the scale (alpha / r times the
user's weight) folded into B. Layout version 3 adds ``<group>.dora_scale`` (DoRA's per-channel factor
on the base matmul's output, default a shape-[1] 1.0; see :mod:`edge_lora.dora`) and an ``lm_head``
slot on tied bases.

Beside model.onnx the exporter writes ``onnx_layout.json`` (:data:`LAYOUT_FILE`): the LoRA slots
and groups, the dtype of the adapter tensors, and where each linear layer's (quantized) weight lives
in the external data file, so the runtime can merge an adapter without the ``onnx`` package.
"""

from __future__ import annotations

from edge_lora.config import ModelConfig
from edge_lora.targets import linear_modules

# modules that share one input and one fused weight (and so one LoRA pair), in output-column order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_FUSED_INTO = {leaf: (group, i) for group, leaves in FUSED.items() for i, leaf in enumerate(leaves)}

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"  # optional scalar input: only the last N positions get logits (0 = all)
# an adapter set's new tokens (ids vocab_size + i), as overridable inputs that are never empty (WebGPU):
# added_embed_rows [1 + n, hidden + 1]: a zero row, then each new token's row with a flag column of 1;
# added_head_rows [1 + n, hidden] (untied bases; a tied head reuses the embedding rows); added_token_index
# [batch, seq]: the row each position takes (0: a base id), default [[0]]. The runtime feeds input_ids
# clamped to the base vocabulary and the index beside them, so the graph holds no integer math. The
# logits gain n columns after the base ones (none by default). The layout's "added_rows" names them.
ADDED_EMBED_ROWS = "added_embed_rows"
ADDED_HEAD_ROWS = "added_head_rows"
ADDED_INDEX = "added_token_index"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
LAYOUT_FILE = "onnx_layout.json"
LAYOUT_FORMAT = "edge-lora-onnx-layout"
LAYOUT_VERSION = 4  # 3: a ``<group>.dora_scale`` input per group, and an lm_head slot on tied bases too
# 4: the added_embed_rows / added_head_rows inputs (new tokens; the logits' vocab dimension is dynamic)
OLDEST_LAYOUT_VERSION = 2  # version 1 had one LoRA input pair per module: its graphs take no grouped feeds
DORA_LAYOUT_VERSION = 3  # the first version whose graphs carry the DoRA rescale
ADDED_ROWS_LAYOUT_VERSION = 4  # the first version whose graphs take new tokens' rows

QUANTS = ("int4", "int8", "fp16", "fp32")
VARIANTS = ("fast", "portable")


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


def lora_a(group: str) -> str:
    return f"{group}.lora_A.T"


def lora_b(group: str) -> str:
    return f"{group}.lora_B.T"


def dora_scale(group: str) -> str:
    return f"{group}.dora_scale"


def lora_slots(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of every linear layer that gets a LoRA side path.

    ``lm_head`` has one on tied bases too (layout version 3): the head's matmul reads the embedding
    table, the side path adds ``x A^T B^T`` to the logits. Older bundles list their own slots.
    """
    return linear_modules(config, include_lm_head=True)


def lora_group(module: str) -> str:
    """The fused group a module belongs to: ``...self_attn.q_proj`` -> ``...self_attn.qkv_proj``."""
    parent, _, leaf = module.rpartition(".")
    fused = _FUSED_INTO.get(leaf)
    return f"{parent}.{fused[0]}" if fused else module


def group_slots(slots: dict[str, tuple[int, int]]) -> dict[str, list[tuple[str, int, int]]]:
    """``{group: [(module, out, in), ...]}`` with each group's modules in output-column order."""
    groups: dict[str, list[tuple[str, int, int]]] = {}
    for module, (out_f, in_f) in slots.items():
        groups.setdefault(lora_group(module), []).append((module, out_f, in_f))
    for members in groups.values():
        members.sort(key=lambda m: _FUSED_INTO.get(m[0].rpartition(".")[2], ("", 0))[1])
    return groups


def lora_groups(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """The decoder's fused linear groups, each one matmul and one LoRA pair (see :func:`group_slots`)."""
    return group_slots(lora_slots(config))
