"""The Llama-family decoder as an ONNX graph with a KV cache and a LoRA slot on every linear layer.

Two variants share the weights code (:mod:`converters.onnx_quantized_ops`) and differ in attention
(:mod:`converters.onnx_attention`) and norms:

fast      SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization and GroupQueryAttention
          (rotary inside, sliding window as ``local_window_size``), MatMulNBits weights.
portable  standard ops only: RMSNorm from Pow/ReduceMean/Sqrt, rotary from a cos/sin table,
          Concat KV cache, explicit causal / window / padding mask, MatMul attention.

q/k/v are one fused matmul and gate/up another (fewer, larger kernels), and each such group has one
LoRA side path ``x @ A^T @ B^T`` over all its modules (``onnx_names.lora_groups``: A^T side by side,
B^T block-diagonal): three nodes per group, since per-node overhead dominates a low-rank side path.
Positions are ``past_length + arange(S)``: batches must not be left-padded (the runtime runs one
sequence per state).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from converters.onnx_attention import gqa, gqa_inputs, plain_attention, portable_mask
from converters.onnx_graph import MS_DOMAIN, Graph
from converters.onnx_quantized_ops import emit_matmul, nbits_gather, nbits_initializers, nbits_matmul
from edge_lora.config import ModelConfig
from edge_lora.importance import Importance
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import names
from edge_lora.onnx_format.base_weights import shares_quantized_table

LORA_DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


@dataclass
class DecoderOptions:
    quant: str = "int4"
    variant: str = "fast"
    block_size: int = 32
    accuracy_level: int = 4
    lora_dtype: str = "float32"
    importance: Importance | None = None  # weighs the 4-bit scale search (edge_lora/importance.py)


class DecoderWriter:
    def __init__(self, md: ModelDir, options: DecoderOptions):
        self.md, self.c, self.o = md, md.config, options
        self.g = Graph("edge_lora_decoder")
        self.fast = options.variant == "fast"
        self.groups = names.lora_groups(self.c)  # {group: [(module, out, in)]}, the one module -> group map
        self.layout = {"weights": {}, "linears": {}}

    # --- building blocks -----------------------------------------------------------

    def weight(self, name: str) -> np.ndarray:
        return self.md.get(name).astype(np.float32)

    def importance(self, group: str) -> np.ndarray | None:
        """The group's input importance from calibration, if the export was given one."""
        return None if self.o.importance is None else self.o.importance.for_module(group)

    def linear(self, x: str, group: str) -> str:
        """One matmul over the group's stacked weights, its biases, then the group's LoRA side path."""
        members = self.groups[group]
        modules = [m for m, _, _ in members]
        weight = (
            np.concatenate([self.weight(f"{m}.weight") for m in modules], axis=0)
            if len(modules) > 1
            else self.weight(f"{modules[0]}.weight")
        )
        out, entry = emit_matmul(
            self.g,
            x,
            group,
            weight,
            self.o.quant,
            self.o.variant,
            self.o.block_size,
            self.o.accuracy_level,
            importance=self.importance(group),
        )
        out = self.dora_rescale(out, group)  # before the bias: PEFT's DoRA rescales W x only
        self.layout["weights"][group] = entry
        start = 0
        for m, rows, _ in members:
            self.layout["linears"][m] = {"weight": group, "rows": [start, start + rows]}
            start += rows
        biases = [f"{m}.bias" for m in modules if self.md.has(f"{m}.bias")]
        if biases:
            bias = np.concatenate([self.weight(b) for b in biases]) if len(biases) == len(modules) else None
            if bias is None:
                raise ValueError(f"{group}: either all or none of {modules} have biases")
            out = self.g.op("Add", [out, self.g.initializer(f"{group}.bias", bias)], f"{group}/BiasAdd")
        return self.g.op("Add", [out, self.lora_path(x, group)], f"{group}/lora/Add")

    def dora_rescale(self, base: str, group: str) -> str:
        """``base * <group>.dora_scale``: DoRA's per-channel factor on the base output, a shape-[1] 1.0
        by default (one broadcast Mul; the plain session has none of it)."""
        # fed [out], or the [1] default
        scale = self.g.add_input(names.dora_scale(group), TensorProto.FLOAT, [f"{group}.dora_out"])
        self.g.initializer(scale, np.ones(1, np.float32))
        return self.g.op("Mul", [base, scale], f"{group}/lora/DoraScale")

    def lora_path(self, x: str, group: str) -> str:
        """``x @ A^T @ B^T`` with the group's A^T ``[in, R]`` and block-diagonal B^T ``[R, out]``."""
        members = self.groups[group]
        in_f, out_f = members[0][2], sum(out for _, out, _ in members)
        np_dtype, onnx_dtype = LORA_DTYPES[self.o.lora_dtype]
        rank = f"{group}.rank"
        a = self.g.add_input(names.lora_a(group), onnx_dtype, [in_f, rank])
        b = self.g.add_input(names.lora_b(group), onnx_dtype, [rank, out_f])
        self.g.initializer(a, np.zeros((in_f, 0), np_dtype))  # rank 0: the base runs unchanged
        self.g.initializer(b, np.zeros((0, out_f), np_dtype))
        if np_dtype != np.float32:
            a = self.g.op("Cast", [a], f"{group}/lora/CastA", to=TensorProto.FLOAT)
            b = self.g.op("Cast", [b], f"{group}/lora/CastB", to=TensorProto.FLOAT)
        low = self.g.op("MatMul", [x, a], f"{group}/lora/MatMulA")
        return self.g.op("MatMul", [low, b], f"{group}/lora/MatMulB")

    def rms_norm(self, x: str, weight_name: str, name: str) -> str:
        w = self.g.initializer(weight_name, self.weight(weight_name))
        eps = float(self.c.rms_norm_eps)
        if self.fast:
            return self.g.op("SimplifiedLayerNormalization", [x, w], name, axis=-1, epsilon=eps, stash_type=1)
        sq = self.g.op("Mul", [x, x], f"{name}/Square")
        mean = self.g.op(
            "ReduceMean", [sq, self.g.const(f"{name}/axes", [-1])], f"{name}/ReduceMean", keepdims=1
        )
        std = self.g.op(
            "Sqrt",
            [self.g.op("Add", [mean, self.g.const(f"{name}/eps", eps, np.float32)], f"{name}/AddEps")],
            f"{name}/Sqrt",
        )
        return self.g.op("Mul", [self.g.op("Div", [x, std], f"{name}/Div"), w], f"{name}/Scale")

    def skip_rms_norm(self, x: str, residual: str, weight_name: str, name: str) -> tuple[str, str]:
        """``(norm(x + residual), x + residual)``."""
        if self.fast:
            w = self.g.initializer(weight_name, self.weight(weight_name))
            outs = self.g.op(
                "SkipSimplifiedLayerNormalization",
                [x, residual, w],
                name,
                outputs=4,
                domain=MS_DOMAIN,
                epsilon=float(self.c.rms_norm_eps),
            )
            return outs[0], outs[3]
        total = self.g.op("Add", [residual, x], f"{name}/Residual")
        return self.rms_norm(total, weight_name, name), total

    # --- the decoder ---------------------------------------------------------------

    def build(self) -> onnx.ModelProto:
        c, g = self.c, self.g
        ids = g.add_input(names.INPUT_IDS, TensorProto.INT64, ["batch_size", "sequence_length"])
        mask = g.add_input(names.ATTENTION_MASK, TensorProto.INT64, ["batch_size", "total_sequence_length"])
        kv_shape = ["batch_size", c.num_key_value_heads, "past_sequence_length", c.head_dim]
        for i in range(c.num_hidden_layers):
            g.add_input(names.past_key(i), TensorProto.FLOAT, kv_shape)
            g.add_input(names.past_value(i), TensorProto.FLOAT, kv_shape)
        x = self.embed(ids)
        attention_inputs = gqa_inputs(g, c, mask) if self.fast else portable_mask(g, c, ids, mask)
        h, residual = (
            self.rms_norm(x, "model.layers.0.input_layernorm.weight", "model.layers.0.input_layernorm"),
            x,
        )
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            attn = self.attention(i, h, attention_inputs)
            h, residual = self.skip_rms_norm(
                attn, residual, f"{p}.post_attention_layernorm.weight", f"{p}.post_attention_layernorm"
            )
            mlp_out = self.mlp(p, h)
            # the residual add fuses into the next layer's input norm, or the final norm after the last layer
            norm = f"model.layers.{i + 1}.input_layernorm" if i + 1 < c.num_hidden_layers else "model.norm"
            h, residual = self.skip_rms_norm(mlp_out, residual, f"{norm}.weight", norm)
        kept = self.keep_last(h)
        g.identity(self.added_logits(kept, self.head(kept)), names.LOGITS)
        # vocab_size + the request's new tokens: a dynamic dimension
        g.add_output(names.LOGITS, TensorProto.FLOAT, ["batch_size", "sequence_length", "vocab_size"])
        present_shape = ["batch_size", c.num_key_value_heads, "total_sequence_length", c.head_dim]
        for i in range(c.num_hidden_layers):
            g.add_output(names.present_key(i), TensorProto.FLOAT, present_shape)
            g.add_output(names.present_value(i), TensorProto.FLOAT, present_shape)
        return g.model(contrib=True)

    def shares_quantized_table(self) -> bool:
        """Tied + MatMulNBits: the embedding gathers from the head's quantized weight (one copy)."""
        return self.fast and shares_quantized_table(self.c, self.o.quant, self.o.block_size)

    def keep_last(self, hidden: str) -> str:
        """Positions the head runs on: the last ``logits_to_keep`` (an overridable scalar, default 0 =
        all), so a prefill that only needs the next token skips ``S - 1`` rows of the vocab matmul."""
        g = self.g
        g.add_input(names.LOGITS_TO_KEEP, TensorProto.INT64, [])
        g.initializer(names.LOGITS_TO_KEEP, np.array(0, dtype=np.int64))
        start = g.op(
            "Reshape",
            [g.op("Neg", [names.LOGITS_TO_KEEP], "keep/Neg"), g.const("keep/shape", [1])],
            "keep/Start",
        )
        return g.op(
            "Slice",
            [hidden, start, g.const("keep/end", [np.iinfo(np.int64).max]), g.const("keep/axes", [1])],
            "keep/Slice",
        )

    def embed(self, ids: str) -> str:
        """The embedding of ``input_ids`` (always base ids: the runtime clamps them) from the table,
        replaced where ``added_token_index`` points at a new token's row of ``added_embed_rows``:
        ``base * (1 - flag) + row``, exact since row 0 (a base id) is zeros with flag 0. Float nodes
        and a Gather only (GPU providers keep it all on the device), no integer math; nothing copies
        the table. Every node is named ``.../lora/Added...``: the plain session has none of it."""
        g, c = self.g, self.c
        p, hidden = "model.embed_tokens/lora/Added", c.hidden_size
        base = self.base_embed(ids)
        table = g.add_input(names.ADDED_EMBED_ROWS, TensorProto.FLOAT, ["added_rows", hidden + 1])
        g.initializer(table, np.zeros((1, hidden + 1), np.float32))
        index = g.add_input(names.ADDED_INDEX, TensorProto.INT64, ["added_batch", "added_sequence"])
        g.initializer(index, np.zeros((1, 1), np.int64))
        picked = g.op("Gather", [table, index], p + "Gather")
        axes, start, split, end = (
            g.const(p + k, v)
            for k, v in (("Axes", [-1]), ("Start", [0]), ("Split", [hidden]), ("End", [hidden + 1]))
        )
        row = g.op("Slice", [picked, start, split, axes], p + "Row")
        flag = g.op("Slice", [picked, split, end, axes], p + "Flag")
        keep = g.op("Sub", [g.const(p + "One", 1.0, np.float32), flag], p + "Keep")
        masked = g.op("Mul", [base, keep], "model.embed_tokens/Mask/lora/Added")
        return g.op("Add", [masked, row], "model.embed_tokens/Rows/lora/Added")

    def added_logits(self, x: str, logits: str) -> str:
        """The new tokens' logits after the base ones: ``x @ rows^T`` over the rows past the zero row
        (``n * hidden`` per position; none without new tokens, so the width stays ``vocab_size``). A
        tied base reuses the embedding rows; an untied one has ``added_head_rows``."""
        g, c = self.g, self.c
        p, hidden = "lm_head/lora/Added", c.hidden_size
        if c.tie_word_embeddings:
            rows, width = names.ADDED_EMBED_ROWS, hidden
        else:
            rows = g.add_input(names.ADDED_HEAD_ROWS, TensorProto.FLOAT, ["added_rows", hidden])
            g.initializer(rows, np.zeros((1, hidden), np.float32))
            width = hidden
        ends = g.const(p + "Ends", [np.iinfo(np.int64).max, width])
        starts, axes = g.const(p + "Starts", [1, 0]), g.const(p + "Axes", [0, 1])
        new_rows = g.op("Slice", [rows, starts, ends, axes], p + "Rows")
        rows_t = g.op("Transpose", [new_rows], p + "Transpose", perm=[1, 0])
        extra = g.op("MatMul", [x, rows_t], p + "MatMul")
        return g.op("Concat", [logits, extra], "lm_head/Concat/lora/Added", axis=-1)

    def base_embed(self, ids: str) -> str:
        table = self.weight("model.embed_tokens.weight")
        if self.shares_quantized_table():
            self.tied_entry = nbits_initializers(
                self.g,
                "lm_head",
                table,
                self.o.quant,
                self.o.block_size,
                symmetric=False,
                importance=self.importance("lm_head"),
            )
            self.layout["weights"]["lm_head"] = self.tied_entry
            return nbits_gather(self.g, ids, "model.embed_tokens", self.tied_entry)
        if self.o.quant == "fp32":
            return self.g.op(
                "Gather",
                [self.g.initializer("model.embed_tokens.weight", table), ids],
                "model.embed_tokens/Gather",
            )
        # a half-precision table: one row per token is read, so this only saves disk and memory
        rows = self.g.op(
            "Gather",
            [self.g.initializer("model.embed_tokens.weight", table.astype(np.float16)), ids],
            "model.embed_tokens/Gather",
        )
        return self.g.op("Cast", [rows], "model.embed_tokens/Cast", to=TensorProto.FLOAT)

    def head(self, x: str) -> str:
        if not self.c.tie_word_embeddings:
            return self.linear(x, "lm_head")
        # tied: the head's matmul reads the embedding table, the LoRA side path goes around it; DoRA's
        # rescale is per vocabulary row, its norm of the table (onnx_merge.WeightStore.tied_head)
        base = self.dora_rescale(self.tied_head(x), "lm_head")
        return self.g.op("Add", [base, self.lora_path(x, "lm_head")], "lm_head/lora/Add")

    def tied_head(self, x: str) -> str:
        c, g = self.c, self.g
        if self.shares_quantized_table():
            return nbits_matmul(g, x, "lm_head", self.tied_entry, self.o.accuracy_level)
        if self.o.quant in ("int4", "int8"):  # a quantized copy of the tied table, the Gather keeps its own
            out, entry = emit_matmul(
                g,
                x,
                "lm_head",
                self.weight("model.embed_tokens.weight"),
                self.o.quant,
                self.o.variant,
                self.o.block_size,
                self.o.accuracy_level,
                importance=self.importance("lm_head"),
            )
            self.layout["weights"]["lm_head"] = entry
            return out
        # float: Gemm on the very table the Gather reads (transB), no second copy on disk
        table = "model.embed_tokens.weight"
        if self.o.quant == "fp16":
            table = g.op("Cast", [table], "lm_head/CastTable", to=TensorProto.FLOAT)
        flat = g.op("Reshape", [x, g.const("lm_head/flat_shape", [-1, c.hidden_size])], "lm_head/Flatten")
        logits = g.op("Gemm", [flat, table], "lm_head/Gemm", transB=1)
        lead = g.op("Shape", [x], "lm_head/LeadShape", start=0, end=2)
        shape = g.op("Concat", [lead, g.const("lm_head/vocab", [c.vocab_size])], "lm_head/OutShape", axis=0)
        return g.op("Reshape", [logits, shape], "lm_head/Unflatten")

    def mlp(self, p: str, h: str) -> str:
        g, i = self.g, self.c.intermediate_size
        gate_up = self.linear(h, f"{p}.mlp.gate_up_proj")
        gate, up = g.op(
            "Split", [gate_up, g.const(f"{p}.mlp/split", [i, i])], f"{p}.mlp/Split", outputs=2, axis=-1
        )
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.mlp/Sigmoid")], f"{p}.mlp/SiLU")
        return self.linear(g.op("Mul", [act, up], f"{p}.mlp/Mul"), f"{p}.mlp.down_proj")

    def attention(self, layer: int, h: str, inputs: dict) -> str:
        p = f"model.layers.{layer}.self_attn"
        qkv = self.linear(h, f"{p}.qkv_proj")
        present = [names.present_key(layer), names.present_value(layer)]
        past = [names.past_key(layer), names.past_value(layer)]
        attend = gqa if self.fast else plain_attention
        out = attend(self.g, self.c, p, qkv, past, present, inputs)
        return self.linear(out, f"{p}.o_proj")


def config_summary(config: ModelConfig) -> str:
    return (
        f"{config.architecture} {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads}/{config.num_key_value_heads} heads"
    )
