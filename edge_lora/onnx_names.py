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
user's weight) folded into B. Layout version 3 adds ``<group>.dora_scale`` (DoRA's per-channel factor
on the base matmul's output, default a shape-[1] 1.0; see :mod:`edge_lora.dora`) and an ``lm_head``
slot on tied bases.

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


def zero_pads(slots: dict[str, tuple[int, int]], dtype=np.float32, skip=()) -> dict[str, np.ndarray]:
    """Rank-1 zero A^T / B^T for every group whose inputs are not in ``skip``: the same result as the
    graph's rank-0 defaults, for WebGPU, which crashes on a zero-size tensor (our GPU path and
    onnxruntime-genai's both feed these instead of relying on the defaults)."""
    pads = {}
    for group, members in group_slots(slots).items():
        if lora_a(group) not in skip:
            pads[lora_a(group)] = np.zeros((members[0][2], 1), dtype)
            pads[lora_b(group)] = np.zeros((1, sum(out_f for _, out_f, _ in members)), dtype)
    return pads


def stack_lora(parts: list[tuple[object, float]], slots: dict[str, tuple[int, int]], dtype=np.float32,
               norms: list[dict | None] | None = None) -> dict[str, np.ndarray]:
    """Feeds for several adapters at once: one A^T / B^T pair per group, every rank block side by side.

    ``parts`` is ``[(Adapter, scale), ...]``; each adapter's own ``alpha / r`` times ``scale`` is
    folded into its B rows, so ``x A^T B^T`` is the weighted sum of the adapters' deltas. Modules
    an adapter leaves out of a group keep zero columns in B. Groups no adapter touches are left
    out: the session uses their rank-0 defaults.

    DoRA adapters need ``norms`` (aligned with ``parts``: :func:`edge_lora.dora.prepare_norms` of
    each, None for plain ones); their groups also get ``<group>.dora_scale [out]`` (float32), the
    factor on the base output, and the DoRA factors are folded into B in ``parts``' order as PEFT
    applies its active adapters (see :mod:`edge_lora.dora`).
    """
    pieces = _pieces(parts, slots, norms)
    feeds = {}
    for group, members in group_slots(slots).items():
        if any(module in pieces for module, _, _ in members):
            feeds[lora_a(group)], feeds[lora_b(group)], scale = _group_pair(members, pieces, dtype)
            if scale is not None:
                feeds[dora_scale(group)] = scale
    return feeds


def _pieces(parts: list[tuple[object, float]], slots: dict,
            norms: list[dict | None] | None = None) -> dict[str, list[tuple]]:
    """``{module: [(LoraWeights, folded scale, DoRA factor or None), ...]}`` in the order of ``parts``,
    after the checks."""
    from .dora import factor, require_norms

    pieces: dict[str, list[tuple]] = {}
    for i, (adapter, scale) in enumerate(parts):
        for module, w in adapter.modules.items():
            if module not in slots:
                hint = ("this bundle's tied-embedding base has no lm_head slot: re-export it with this "
                        "edge-lora" if module == LM_HEAD else "wrong base model?")
                raise EdgeLoraError(f"adapter module {module!r} has no LoRA slot in this ONNX model", hint=hint)
            c = scale * adapter.scale(module)
            d = None
            if w.magnitude is not None:
                d = factor(w, require_norms(norms[i] if norms else None)[module], c)
            pieces.setdefault(module, []).append((w, c, d))
    return pieces


def added_rows_feeds(embed: np.ndarray | None, head: np.ndarray | None, tied: bool) -> dict[str, np.ndarray]:
    """The graph's new-token tables for ``[n, hidden]`` rows (none when there are no new tokens)."""
    if embed is None or not len(embed):
        return {}
    n, hidden = embed.shape
    table = np.zeros((n + 1, hidden + 1), np.float32)
    table[1:, :hidden], table[1:, hidden] = embed, 1.0
    feeds = {ADDED_EMBED_ROWS: table}
    if not tied:
        zero = np.zeros((1, hidden), np.float32)
        feeds[ADDED_HEAD_ROWS] = np.concatenate([zero, np.asarray(head, np.float32)])
    return feeds


def split_added_ids(ids: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, added_token_index)`` for ids that may lie past the base vocabulary."""
    index = np.where(ids >= vocab, ids - (vocab - 1), 0)
    return np.minimum(ids, vocab - 1), index


def _group_pair(members: list[tuple[str, int, int]], pieces: dict,
                dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A^T ``[in, R]``, block-diagonal B^T ``[R, out]`` and the DoRA factor ``[out]`` (None: no DoRA)
    of one group, allocated once and filled in place: each byte is written once (the first request
    with a new set waits for this)."""
    from .dora import chain

    rank = sum(w.rank for module, _, _ in members for w, _, _ in pieces.get(module, ()))
    a = np.empty((members[0][2], rank), dtype)
    b = np.zeros((rank, sum(out_f for _, out_f, _ in members)), dtype)
    dora = None
    row = col = 0
    for module, out_f, _ in members:
        folds, base = chain(pieces.get(module, []), out_f)
        if base is not None:
            if dora is None:
                dora = np.ones(b.shape[1], np.float32)
            dora[col:col + out_f] = base
        for (w, scale, _), fold in zip(pieces.get(module, ()), folds):
            a[:, row:row + w.rank] = w.a.T
            # scaled in float32 whatever the feed dtype, then cast once on the way in
            block = b[row:row + w.rank, col:col + out_f]
            if fold is None:
                np.multiply(w.b.T, np.float32(scale), out=block, dtype=np.float32, casting="unsafe")
            else:
                block[...] = (w.b.T.astype(np.float64) * (scale * fold)[None, :]).astype(dtype)
            row += w.rank
        col += out_f
    return a, b, dora


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
