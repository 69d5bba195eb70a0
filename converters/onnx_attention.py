"""Attention in the ONNX decoder, the one place its two variants differ most.

fast      GroupQueryAttention (com.microsoft): rotary inside, KV cache updated in place, a sliding
          window as ``local_window_size``; its inputs are the sequence lengths and cos/sin caches.
portable  standard ops only: rotary from a cos/sin table gathered at the query positions, a Concat
          KV cache, and an explicit causal / window / padding mask added to the MatMul scores.

Each function adds its nodes to ``g`` for the model ``c``; the node names are the graph's contract
with the runtime's tests, so they stay as they are.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from converters.onnx_graph import MS_DOMAIN, Graph
from edge_lora.config import ModelConfig

# --- fast attention: GroupQueryAttention ---------------------------------------


def gqa_inputs(g: Graph, c: ModelConfig, mask: str) -> dict:
    total = g.op("ReduceSum", [mask, g.const("gqa/axes", [1])], "gqa/ReduceSum", keepdims=0)
    seqlens = g.op(
        "Cast",
        [g.op("Sub", [total, g.const("gqa/one", 1)], "gqa/Sub")],
        "gqa/SeqLens",
        to=TensorProto.INT32,
    )
    length = g.op(
        "Gather", [g.op("Shape", [mask], "gqa/Shape"), g.const("gqa/index", 1)], "gqa/TotalLength", axis=0
    )
    freqs = np.outer(np.arange(c.max_position_embeddings, dtype=np.float64), c.rope_inv_freq())
    return {
        "seqlens_k": seqlens,
        "total_length": g.op("Cast", [length], "gqa/TotalLengthInt", to=TensorProto.INT32),
        "cos": g.initializer("rotary.cos_cache", np.cos(freqs).astype(np.float32)),
        "sin": g.initializer("rotary.sin_cache", np.sin(freqs).astype(np.float32)),
    }


def gqa(g: Graph, c: ModelConfig, p: str, qkv: str, past: list[str], present: list[str], t: dict) -> str:
    # local_window_size = W gives HF's i - j < W (checked against transformers on Mistral)
    window = c.sliding_window if c.sliding_window else -1
    outs = g.op(
        "GroupQueryAttention",
        [qkv, "", "", *past, t["seqlens_k"], t["total_length"], t["cos"], t["sin"]],
        f"{p}/GroupQueryAttention",
        outputs=[f"{p}/GroupQueryAttention/0", *present],
        domain=MS_DOMAIN,
        num_heads=c.num_attention_heads,
        kv_num_heads=c.num_key_value_heads,
        scale=float(c.head_dim**-0.5),
        do_rotary=1,
        rotary_interleaved=0,
        local_window_size=window,
    )
    return outs[0]


# --- portable attention: standard ops ------------------------------------------


def portable_mask(g: Graph, c: ModelConfig, ids: str, mask: str) -> dict:
    """``{bias, cos, sin}``: the additive mask ``[B, 1, S, T]`` and the rotary rows of the new positions."""
    new = g.op("Shape", [ids], "mask/NewLength", start=1, end=2)
    total = g.op("Shape", [mask], "mask/TotalLength", start=1, end=2)
    past = g.op("Sub", [total, new], "mask/PastLength")
    scalar = lambda v, n: g.op("Squeeze", [v, g.const(f"mask/{n}_axes", [0])], f"mask/{n}_Scalar")  # noqa: E731
    one, zero = g.const("mask/one", 1), g.const("mask/zero", 0)
    q_pos = g.op("Range", [scalar(past, "past"), scalar(total, "total"), one], "mask/QueryPositions")
    k_pos = g.op("Range", [zero, scalar(total, "total2"), one], "mask/KeyPositions")
    bias = _mask_bias(g, c, mask, q_pos, k_pos)
    cos, sin = _rotary_rows(g, c, q_pos)
    return {"bias": bias, "cos": cos, "sin": sin}


def _mask_bias(g: Graph, c: ModelConfig, mask: str, q_pos: str, k_pos: str) -> str:
    """0 where a query may attend a key (causal, inside the window, not padding), float min elsewhere."""
    q_col = g.op("Unsqueeze", [q_pos, g.const("mask/col_axes", [1])], "mask/QueryColumn")
    k_row = g.op("Unsqueeze", [k_pos, g.const("mask/row_axes", [0])], "mask/KeyRow")
    allowed = g.op("LessOrEqual", [k_row, q_col], "mask/Causal")
    if c.sliding_window:
        dist = g.op("Sub", [q_col, k_row], "mask/Distance")
        inside = g.op("Less", [dist, g.const("mask/window", c.sliding_window)], "mask/Window")
        allowed = g.op("And", [allowed, inside], "mask/CausalWindow")
    padding = g.op(
        "Cast",
        [g.op("Unsqueeze", [mask, g.const("mask/pad_axes", [1, 2])], "mask/PadUnsqueeze")],
        "mask/PadBool",
        to=TensorProto.BOOL,
    )
    allowed = g.op("And", [allowed, padding], "mask/Allowed")
    return g.op(
        "Where",
        [
            allowed,
            g.const("mask/zero_f", 0.0, np.float32),
            g.const("mask/min_f", np.finfo(np.float32).min, np.float32),
        ],
        "mask/Bias",
    )


def _rotary_rows(g: Graph, c: ModelConfig, q_pos: str) -> tuple[str, str]:
    """The cos and sin rows of the query positions, gathered from tables over every position."""
    freqs = np.outer(np.arange(c.max_position_embeddings, dtype=np.float64), c.rope_inv_freq())
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos = g.op(
        "Gather",
        [g.initializer("rotary.cos_table", np.cos(emb).astype(np.float32)), q_pos],
        "rotary/Cos",
        axis=0,
    )
    sin = g.op(
        "Gather",
        [g.initializer("rotary.sin_table", np.sin(emb).astype(np.float32)), q_pos],
        "rotary/Sin",
        axis=0,
    )
    return cos, sin


def rotary(g: Graph, c: ModelConfig, name: str, x: str, t: dict) -> str:
    half = c.head_dim // 2
    x1, x2 = g.op("Split", [x, g.const(f"{name}/halves", [half, half])], f"{name}/Split", outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2], f"{name}/Neg"), x1], f"{name}/RotateHalf", axis=-1)
    return g.op(
        "Add",
        [
            g.op("Mul", [x, t["cos"]], f"{name}/MulCos"),
            g.op("Mul", [rotated, t["sin"]], f"{name}/MulSin"),
        ],
        f"{name}/Add",
    )


def heads(g: Graph, c: ModelConfig, name: str, x: str, count: int) -> str:
    """``[B, S, count*d]`` -> ``[B, count, S, d]``."""
    shaped = g.op("Reshape", [x, g.const(f"{name}/shape", [0, 0, count, c.head_dim])], f"{name}/Reshape")
    return g.op("Transpose", [shaped], f"{name}/Transpose", perm=[0, 2, 1, 3])


def repeat_kv(g: Graph, c: ModelConfig, name: str, x: str) -> str:
    groups = c.num_attention_heads // c.num_key_value_heads
    if groups == 1:
        return x
    wide = g.op("Unsqueeze", [x, g.const(f"{name}/axes", [2])], f"{name}/Unsqueeze")
    wide = g.op("Expand", [wide, g.const(f"{name}/expand", [1, 1, groups, 1, 1])], f"{name}/Expand")
    return g.op(
        "Reshape",
        [wide, g.const(f"{name}/shape", [0, c.num_attention_heads, -1, c.head_dim])],
        f"{name}/Reshape",
    )


def plain_attention(
    g: Graph, c: ModelConfig, p: str, qkv: str, past: list[str], present: list[str], t: dict
) -> str:
    q, k, v = g.op(
        "Split",
        [qkv, g.const(f"{p}/split", [c.q_dim, c.kv_dim, c.kv_dim])],
        f"{p}/Split",
        outputs=3,
        axis=-1,
    )
    q = rotary(g, c, f"{p}/q_rotary", heads(g, c, f"{p}/q_heads", q, c.num_attention_heads), t)
    k = rotary(g, c, f"{p}/k_rotary", heads(g, c, f"{p}/k_heads", k, c.num_key_value_heads), t)
    v = heads(g, c, f"{p}/v_heads", v, c.num_key_value_heads)
    k_all = g.op("Concat", [past[0], k], f"{p}/KeyCache", outputs=[present[0]], axis=2)
    v_all = g.op("Concat", [past[1], v], f"{p}/ValueCache", outputs=[present[1]], axis=2)
    k_t = g.op("Transpose", [repeat_kv(g, c, f"{p}/k_repeat", k_all)], f"{p}/KeyTranspose", perm=[0, 1, 3, 2])
    scores = g.op(
        "Mul",
        [g.op("MatMul", [q, k_t], f"{p}/QK"), g.const(f"{p}/scale", c.head_dim**-0.5, np.float32)],
        f"{p}/Scale",
    )
    probs = g.op("Softmax", [g.op("Add", [scores, t["bias"]], f"{p}/Mask")], f"{p}/Softmax", axis=-1)
    ctx = g.op("MatMul", [probs, repeat_kv(g, c, f"{p}/v_repeat", v_all)], f"{p}/PV")
    ctx = g.op("Transpose", [ctx], f"{p}/OutTranspose", perm=[0, 2, 1, 3])
    return g.op("Reshape", [ctx, g.const(f"{p}/out_shape", [0, 0, -1])], f"{p}/OutReshape")
