"""Fold adapters into the exported weights, whatever their quantization: dequantize, add, requantize.

Reads the tensors ``onnx_layout.json`` points at straight from the memory-mapped data file (no
``onnx`` package on the device) and returns replacement arrays, which the backend hands to ONNX
Runtime as initializer overrides (``SessionOptions.add_initializer``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format import weight_quant as q

NUMPY_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "uint8": np.uint8,
    "int8": np.int8,
    "int4": np.uint8,
}


class WeightStore:
    """The current value of every linear weight: the file's, or the last merge's replacement."""

    def __init__(self, layout: dict, data_path: Path):
        self.layout = layout
        self.data_path = data_path
        self.replaced: dict[str, np.ndarray] = {}  # initializer name -> array (int4 kept unpacked as int8)

    def tensor(self, name: str) -> np.ndarray:
        if name in self.replaced:
            return self.replaced[name]
        info = self.layout["tensors"].get(name)
        if info is None:
            raise EdgeLoraError(
                f"onnx_layout.json does not place tensor {name!r}",
                path=self.data_path.parent,
                hint="re-export the bundle",
            )
        shape = tuple(info["shape"])
        if info["dtype"] == "int4":
            raw = np.memmap(
                self.data_path, dtype=np.uint8, mode="r", offset=info["offset"], shape=(info["length"],)
            )
            return q.unpack_int4(np.asarray(raw), shape)
        return np.array(
            np.memmap(
                self.data_path,
                dtype=NUMPY_DTYPES[info["dtype"]],
                mode="r",
                offset=info["offset"],
                shape=shape,
            )
        )

    def dequantized(self, group: str) -> np.ndarray:
        """``W [N, K]`` float32 of one weight group (fused q/k/v, gate/up, or a single layer)."""
        entry = self.layout["weights"][group]
        t = {role: self.tensor(name) for role, name in entry["tensors"].items()}
        kind = entry["kind"]
        if kind == "nbits":
            return q.dequantize_nbits(
                q.NBitsWeight(
                    t["packed"],
                    t["scales"],
                    t.get("zero_points"),
                    entry["bits"],
                    entry["block_size"],
                    entry["k"],
                )
            )
        if kind == "float_t":
            return t["weight_t"].astype(np.float32).T
        if kind == "qdq8_t":
            return q.dequantize_int8_channel(t["weight_t"], t["scales"])
        if kind == "qdq4_t":
            return q.dequantize_int4_block_t(t["weight_t"], t["scales"], entry["block_size"])
        raise EdgeLoraError(f"unknown weight kind {kind!r} in onnx_layout.json", path=self.data_path.parent)

    def module_weights(self, path: str | os.PathLike | None = None) -> Callable[[str], np.ndarray]:
        """``weight_of(module) -> W [out, in]`` float32 for DoRA's norms: each fused group dequantized once
        (q/k/v share one), a tied head's weight the embedding table (:meth:`tied_head_weight`)."""
        groups: dict[str, np.ndarray] = {}

        def weight_of(module: str) -> np.ndarray:
            where = self.layout["linears"].get(module)
            if where is None:
                return self.tied_head_weight(path)
            if where["weight"] not in groups:
                groups[where["weight"]] = self.dequantized(where["weight"])
            start, end = where["rows"]
            return groups[where["weight"]][start:end]

        return weight_of

    def tied_head_weight(self, path: str | os.PathLike | None = None) -> np.ndarray:
        """``[vocab, hidden]`` float32: the embedding table a tied head's matmul reads (for DoRA's norm on
        it; never listed under ``linears``, so a merge cannot write into the shared table)."""
        if not self.layout.get("tied_head_dora"):
            raise EdgeLoraError(
                "this bundle's ONNX graph has no DoRA rescale on its tied head",
                path=path,
                hint="re-export the bundle with this edge-lora",
            )
        if "lm_head" in self.layout["weights"]:  # a quantized copy of the table, or the one the Gather shares
            return self.dequantized("lm_head")
        return self.tensor("model.embed_tokens.weight").astype(np.float32)

    def requantize(self, group: str, weight: np.ndarray) -> dict[str, np.ndarray]:
        """Quantize ``weight`` back into the group's own format; returns ``{initializer: array}``."""
        entry = self.layout["weights"][group]
        names, kind = entry["tensors"], entry["kind"]
        if kind == "nbits":
            nb = q.quantize_nbits(
                weight, entry["bits"], entry["block_size"], symmetric="zero_points" not in names
            )
            new = {names["packed"]: nb.packed, names["scales"]: nb.scales}
            if "zero_points" in names:
                new[names["zero_points"]] = nb.zero_points
        elif kind == "float_t":
            dtype = NUMPY_DTYPES[self.layout["tensors"][names["weight_t"]]["dtype"]]
            new = {names["weight_t"]: np.ascontiguousarray(weight.T.astype(dtype))}
        elif kind == "qdq8_t":
            w_q, scales = q.quantize_int8_channel(weight)
            new = {names["weight_t"]: w_q, names["scales"]: scales}
        else:
            w_q, scales = q.quantize_int4_block_t(weight, entry["block_size"])
            new = {names["weight_t"]: w_q, names["scales"]: scales}
        self.replaced.update(new)
        return new

    def merge(self, adapter: Adapter, scale: float) -> dict[str, np.ndarray]:
        """Fold ``adapter`` (at ``scale``) into every group it touches; returns the replaced tensors."""
        groups: dict[str, list[str]] = {}
        for module in adapter.modules:
            where = self.layout["linears"].get(module)
            if where is None:
                hint = (
                    "a tied-embedding base has no separate lm_head"
                    if module == "lm_head"
                    else "wrong base model?"
                )
                raise EdgeLoraError(
                    f"cannot merge module {module!r}: the ONNX model has no such weight", hint=hint
                )
            groups.setdefault(where["weight"], []).append(module)
        replaced = {}
        for group, modules in groups.items():
            weight = self.dequantized(group)
            for module in modules:
                start, end = self.layout["linears"][module]["rows"]
                weight[start:end] = adapter.merged_weight(module, weight[start:end], scale)
            replaced.update(self.requantize(group, weight))
        return replaced
