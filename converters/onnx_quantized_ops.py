"""One linear layer's weight as ONNX nodes, in the chosen quantization and graph variant.

fast:      int4 / int8 -> MatMulNBits (com.microsoft, accuracy_level 4 = int8 activations on CPU)
portable:  int8 -> DequantizeLinear per output channel + MatMul; int4 -> blocked DequantizeLinear
           (opset 21) + MatMul; both standard ops that NNAPI, CoreML, XNNPACK and QNN take.
both:      fp16 -> fp16 weight + Cast + MatMul; fp32 -> MatMul.

Each call returns the output name and a layout entry naming the initializers, which the runtime
uses to merge an adapter into these very tensors (see :mod:`edge_lora.onnx_format.weight_quant`).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from converters.onnx_graph import MS_DOMAIN, Graph
from edge_lora.onnx_format import weight_quant as q
from edge_lora.onnx_format.base_weights import quantize_base_weight


def emit_matmul(
    g: Graph,
    x: str,
    name: str,
    weight: np.ndarray,
    quant: str,
    variant: str,
    block_size: int = q.DEFAULT_BLOCK_SIZE,
    accuracy_level: int = 4,
    importance: np.ndarray | None = None,
) -> tuple[str, dict]:
    """``x @ weight.T`` for ``weight [N, K]``; returns ``(output, layout entry)``. ``importance``
    (``[K]``, edge_lora/importance.py) weighs the 4-bit scale search."""
    n, k = weight.shape
    entry = {"n": n, "k": k}
    if quant in ("int4", "int8") and variant == "fast":
        entry = nbits_initializers(g, name, weight, quant, block_size, importance=importance)
        return nbits_matmul(g, x, name, entry, accuracy_level), entry
    if quant == "int8":
        w_q, scales = q.quantize_int8_channel(weight)
        tensors = {
            "weight_t": g.initializer(f"{name}.weight_q", w_q),
            "scales": g.initializer(f"{name}.weight_scales", scales),
        }
        w = g.op(
            "DequantizeLinear", [tensors["weight_t"], tensors["scales"]], f"{name}/DequantizeLinear", axis=1
        )
        return g.op("MatMul", [x, w], f"{name}/MatMul"), {**entry, "kind": "qdq8_t", "tensors": tensors}
    if quant == "int4":
        w_q, scales = q.quantize_int4_block_t(weight, block_size, importance)
        tensors = {
            "weight_t": g.raw_initializer(
                f"{name}.weight_q", TensorProto.INT4, list(w_q.shape), q.pack_int4(w_q)
            ),
            "scales": g.initializer(f"{name}.weight_scales", scales),
        }
        w = g.op(
            "DequantizeLinear",
            [tensors["weight_t"], tensors["scales"]],
            f"{name}/DequantizeLinear",
            axis=0,
            block_size=block_size,
        )
        return g.op("MatMul", [x, w], f"{name}/MatMul"), {
            **entry,
            "kind": "qdq4_t",
            "block_size": block_size,
            "tensors": tensors,
        }
    if quant == "fp16":
        tensors = {"weight_t": g.initializer(f"{name}.weight_t", weight.T.astype(np.float16))}
        w = g.op("Cast", [tensors["weight_t"]], f"{name}/Cast", to=TensorProto.FLOAT)
        return g.op("MatMul", [x, w], f"{name}/MatMul"), {**entry, "kind": "float_t", "tensors": tensors}
    if quant == "fp32":
        tensors = {"weight_t": g.initializer(f"{name}.weight_t", weight.T.astype(np.float32))}
        return g.op("MatMul", [x, tensors["weight_t"]], f"{name}/MatMul"), {
            **entry,
            "kind": "float_t",
            "tensors": tensors,
        }
    raise ValueError(f"unknown quantization {quant!r}")


def nbits_initializers(
    g: Graph,
    name: str,
    weight: np.ndarray,
    quant: str,
    block_size: int,
    symmetric: bool = True,
    importance: np.ndarray | None = None,
) -> dict:
    """MatMulNBits tensors of ``weight [N, K]`` as initializers; returns their layout entry.

    ``symmetric`` weights carry no zero points (MatMulNBits' defaults: the faster kernel); the
    tied embedding table passes False, GatherBlockQuantized reading it takes explicit ones."""
    n, k = weight.shape
    nb = quantize_base_weight(name, weight, quant, block_size, gathered=not symmetric, importance=importance)
    bits = nb.bits
    tensors = {
        "packed": g.initializer(f"{name}.weight_q", nb.packed),
        "scales": g.initializer(f"{name}.weight_scales", nb.scales),
    }
    if not symmetric:
        tensors["zero_points"] = g.initializer(f"{name}.weight_zp", nb.zero_points)
    # no "zero_points" tensor = symmetric: what the merge requantizes to
    # (edge_lora/onnx_format/weight_store.py)
    return {"n": n, "k": k, "kind": "nbits", "bits": bits, "block_size": nb.block_size, "tensors": tensors}


def nbits_matmul(g: Graph, x: str, name: str, entry: dict, accuracy_level: int = 4) -> str:
    t = entry["tensors"]
    zero_points = [t["zero_points"]] if "zero_points" in t else []
    return g.op(
        "MatMulNBits",
        [x, t["packed"], t["scales"], *zero_points],
        f"{name}/MatMulNBits",
        domain=MS_DOMAIN,
        K=entry["k"],
        N=entry["n"],
        bits=entry["bits"],
        block_size=entry["block_size"],
        accuracy_level=accuracy_level,
    )


def nbits_gather(g: Graph, ids: str, name: str, entry: dict) -> str:
    """Rows of a MatMulNBits weight, dequantized (GatherBlockQuantized reads the very same bytes):
    a tied embedding table and its head share one quantized copy."""
    t, n = entry["tensors"], entry["n"]

    def rows(tensor: str, label: str) -> str:
        return g.op("Reshape", [tensor, g.const(f"{name}/{label}_shape", [n, -1])], f"{name}/{label}_rows")

    return g.op(
        "GatherBlockQuantized",
        [rows(t["packed"], "packed"), ids, rows(t["scales"], "scales"), rows(t["zero_points"], "zp")],
        f"{name}/GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=1,
        block_size=entry["block_size"],
        bits=entry["bits"],
    )
