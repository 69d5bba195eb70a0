"""A tiny ONNX graph writer: nodes, initializers, constants and typed I/O, with readable names.

The decoder is written node by node with ``onnx.helper`` (as ONNX Runtime GenAI's model builder
does), never traced, so every node is one we chose and every name is predictable.
"""

from __future__ import annotations

import numpy as np
import onnx
from numpy.typing import ArrayLike, DTypeLike
from onnx import TensorProto, helper, numpy_helper

OPSET = 21  # blocked DequantizeLinear (int4) needs 21
MS_DOMAIN = "com.microsoft"

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class Graph:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()

    def op(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        outputs: int | list[str] = 1,
        domain: str = "",
        **attrs: object,
    ) -> str | list[str]:
        """Add a node named ``name``; its outputs are ``name/0``, ``name/1``... unless given by name.

        Returns the output name (one output) or the list of names (several).
        """
        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        outs = list(outputs) if isinstance(outputs, list) else [f"{name}/{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(
            numpy_helper.from_array(np.asarray(array, order="C"), name)
        )  # keeps 0-d arrays 0-d
        return name

    def raw_initializer(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        tensor = TensorProto(name=name, data_type=data_type, dims=dims, raw_data=raw)
        self.initializers.append(tensor)
        return name

    def const(self, name: str, values: ArrayLike, dtype: DTypeLike = np.int64) -> str:
        """A small constant kept inside the graph (a Constant node, never external data)."""
        tensor = numpy_helper.from_array(np.asarray(values, dtype=dtype), name + "/value")
        return self.op("Constant", [], name, value=tensor)

    def add_input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def identity(self, source: str, target: str) -> None:
        """Route ``source`` to a graph output called ``target``."""
        self.nodes.append(helper.make_node("Identity", [source], [target], name=f"{target}/Identity"))

    def model(self, contrib: bool) -> onnx.ModelProto:
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(MS_DOMAIN, 1)] if contrib else [])
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edge-lora")
        model.ir_version = 10
        return model
