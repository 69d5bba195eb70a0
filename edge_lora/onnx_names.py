"""Names shared by the ONNX exporter and the ONNX runtime backend, and the LoRA feeds they agree on.

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
user's weight) folded into B.

Beside model.onnx the exporter writes ``onnx_layout.json`` (:data:`LAYOUT_FILE`): the LoRA slots
and groups, the dtype of the adapter tensors, and where each linear layer's (quantized) weight lives
in the external data file, so the runtime can merge an adapter without the ``onnx`` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import EdgeLoraError
from .targets import LM_HEAD, linear_modules

# modules that share one input and one fused weight (and so one LoRA pair), in output-column order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_FUSED_INTO = {leaf: (group, i) for group, leaves in FUSED.items() for i, leaf in enumerate(leaves)}

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"  # optional scalar input: only the last N positions get logits (0 = all)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
LAYOUT_FILE = "onnx_layout.json"
LAYOUT_FORMAT = "edge-lora-onnx-layout"
LAYOUT_VERSION = 2
OLDEST_LAYOUT_VERSION = 2  # version 1 had one LoRA input pair per module: its graphs take no grouped feeds

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


def lora_slots(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of every linear layer that gets a LoRA side path.

    ``lm_head`` gets one only on an untied base (a tied head shares the embedding matrix).
    """
    return linear_modules(config, include_lm_head=not config.tie_word_embeddings)


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


def stack_lora(parts: list[tuple[object, float]], slots: dict[str, tuple[int, int]], dtype=np.float32) -> dict[str, np.ndarray]:
    """Feeds for several adapters at once: one A^T / B^T pair per group, every rank block side by side.

    ``parts`` is ``[(Adapter, scale), ...]``; each adapter's own ``alpha / r`` times ``scale`` is
    folded into its B rows, so ``x A^T B^T`` is the weighted sum of the adapters' deltas. Modules
    an adapter leaves out of a group keep zero columns in B. Groups no adapter touches are left
    out: the session uses their rank-0 defaults.
    """
    pieces = _pieces(parts, slots)
    feeds = {}
    for group, members in group_slots(slots).items():
        if any(module in pieces for module, _, _ in members):
            feeds[lora_a(group)], feeds[lora_b(group)] = _group_pair(members, pieces, dtype)
    return feeds


def _pieces(parts: list[tuple[object, float]], slots: dict) -> dict[str, list[tuple[object, float]]]:
    """``{module: [(LoraWeights, folded scale), ...]}`` in the order of ``parts``, after the checks."""
    pieces: dict[str, list[tuple[object, float]]] = {}
    for adapter, scale in parts:
        if getattr(adapter, "embed_rows", None) is not None:
            raise EdgeLoraError("adapters with new tokens cannot run unmerged on the ONNX backend",
                                hint="merge the new tokens into the base at export")
        for module, w in adapter.modules.items():
            if module not in slots:
                hint = "a tied-embedding base has no separate lm_head" if module == LM_HEAD else "wrong base model?"
                raise EdgeLoraError(f"adapter module {module!r} has no LoRA slot in this ONNX model", hint=hint)
            if w.magnitude is not None:
                raise EdgeLoraError(f"module {module!r} is DoRA, which cannot run as a side path",
                                    hint="merge it: engine.merge(name)")
            pieces.setdefault(module, []).append((w, scale * adapter.scale(module)))
    return pieces


def _group_pair(members: list[tuple[str, int, int]], pieces: dict, dtype) -> tuple[np.ndarray, np.ndarray]:
    """A^T ``[in, R]`` and block-diagonal B^T ``[R, out]`` of one group, allocated once and filled
    in place: each byte is written once (the first request with a new set waits for this)."""
    rank = sum(w.rank for module, _, _ in members for w, _ in pieces.get(module, ()))
    a = np.empty((members[0][2], rank), dtype)
    b = np.zeros((rank, sum(out_f for _, out_f, _ in members)), dtype)
    row = col = 0
    for module, out_f, _ in members:
        for w, scale in pieces.get(module, ()):
            a[:, row:row + w.rank] = w.a.T
            # scaled in float32 whatever the feed dtype, then cast once on the way in
            np.multiply(w.b.T, np.float32(scale), out=b[row:row + w.rank, col:col + out_f], dtype=np.float32, casting="unsafe")
            row += w.rank
        col += out_f
    return a, b


def read_layout(model_path: str | os.PathLike) -> dict:
    """The exporter's ``onnx_layout.json`` beside ``model_path``, checked for format and version."""
    path = Path(model_path).parent / LAYOUT_FILE
    if not path.is_file():
        raise EdgeLoraError(f"no {LAYOUT_FILE} beside the ONNX model", path=path.parent, hint="re-export the bundle with edge-lora")
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeLoraError(f"{LAYOUT_FILE} is not valid JSON", path=path, hint="re-export the bundle") from None
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        raise EdgeLoraError(f"{LAYOUT_FILE} is not an edge-lora ONNX layout", path=path)
    if isinstance(layout.get("version"), int) and layout["version"] < OLDEST_LAYOUT_VERSION:
        raise EdgeLoraError(f"ONNX layout version {layout['version']} has one LoRA input pair per module, which this "
                            "edge-lora no longer feeds", path=path, hint="re-export the bundle with this edge-lora")
    if not isinstance(layout.get("version"), int) or layout["version"] > LAYOUT_VERSION:
        raise EdgeLoraError(f"ONNX layout version {layout.get('version')!r} is newer than this edge-lora reads", path=path,
                            hint="upgrade edge-lora")
    return layout
