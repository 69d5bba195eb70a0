"""Names shared by the ONNX exporter and the ONNX runtime backend, and the LoRA feeds they agree on.

Graph I/O follows onnxruntime-genai's decoder convention so that it loads our folder as it is:
``input_ids``, ``attention_mask``, ``past_key_values.N.key|value`` in, ``logits``,
``present.N.key|value`` out.

Every LoRA target has a side path ``x @ A^T @ B^T`` whose two tensors are overridable
initializers (graph inputs with a rank-0 default). The graph stores them transposed, ready for
MatMul: ``<module>.lora_A.T [in, r]`` and ``<module>.lora_B.T [r, out]``; the adapter file keeps
PEFT's ``[r, in]`` / ``[out, r]``. The scale (alpha / r times the user's weight) is folded into B.

Beside model.onnx the exporter writes ``onnx_layout.json`` (:data:`LAYOUT_FILE`): the LoRA slots,
the dtype of the adapter tensors, and where each linear layer's (quantized) weight lives in the
external data file, so the runtime can merge an adapter without the ``onnx`` package.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import EdgeLoraError
from .targets import LM_HEAD, linear_modules

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"  # optional scalar input: only the last N positions get logits (0 = all)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
LAYOUT_FILE = "onnx_layout.json"
LAYOUT_FORMAT = "edge-lora-onnx-layout"
LAYOUT_VERSION = 1

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


def lora_a(module: str) -> str:
    return f"{module}.lora_A.T"


def lora_b(module: str) -> str:
    return f"{module}.lora_B.T"


def lora_slots(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of every linear layer that gets a LoRA side path.

    ``lm_head`` gets one only on an untied base (a tied head shares the embedding matrix).
    """
    return linear_modules(config, include_lm_head=not config.tie_word_embeddings)


def stack_lora(parts: list[tuple[object, float]], slots: dict[str, tuple[int, int]], dtype=np.float32) -> dict[str, np.ndarray]:
    """Feeds for several adapters at once: A^T and B^T concatenated along the rank.

    ``parts`` is ``[(Adapter, scale), ...]``; each adapter's own ``alpha / r`` times ``scale`` is
    folded into its B rows, so ``x A^T B^T`` is the weighted sum of the adapters' deltas.
    Modules no adapter touches are left out: the session uses their rank-0 defaults.
    """
    per_module: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
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
            b_t = (w.b.astype(np.float32) * np.float32(scale * adapter.scale(module))).T
            per_module.setdefault(module, []).append((w.a.astype(np.float32).T, b_t))
    feeds = {}
    for module, pairs in per_module.items():
        feeds[lora_a(module)] = np.ascontiguousarray(np.concatenate([a for a, _ in pairs], axis=1), dtype=dtype)
        feeds[lora_b(module)] = np.ascontiguousarray(np.concatenate([b for _, b in pairs], axis=0), dtype=dtype)
    return feeds


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
    if not isinstance(layout.get("version"), int) or layout["version"] > LAYOUT_VERSION:
        raise EdgeLoraError(f"ONNX layout version {layout.get('version')!r} is newer than this edge-lora reads", path=path,
                            hint="upgrade edge-lora")
    return layout
