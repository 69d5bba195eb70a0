"""``engine.merge()`` on the ONNX engine: the touched weights dequantized, added to and requantized
(:class:`~edge_lora.onnx_format.weight_store.WeightStore`), then the sessions reopened with those
initializers overridden, so a merged adapter costs nothing per token.
"""

from __future__ import annotations

import numpy as np

from runtime.engine import LoadedAdapter

INT4_ONNX_TYPE = 22  # TensorProto.INT4


class OnnxMerge:
    """The merge half of :class:`~runtime.onnx_backend.OnnxEngine` (mixed into it): merged weights
    become entries of the engine's ``_overrides`` (initializer name -> (array, OrtValue borrowing
    it)); DoRA norms and cached sets computed from the old weights are refreshed or dropped."""

    def _merge(self, name: str, loaded: LoadedAdapter, scale: float) -> None:
        self._lora.wait()  # let a session still opening in the background finish first
        replaced = self.weights.merge(loaded.adapter, scale)
        for tensor, array in replaced.items():
            array = np.ascontiguousarray(array)
            if self.layout["tensors"][tensor]["dtype"] == "int4":
                array = self._int4_ortvalue_source(array)
                value = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, INT4_ONNX_TYPE)
            else:
                value = self._ort.OrtValue.ortvalue_from_numpy(array)
            self._overrides[tensor] = (array, value)
        # DoRA norms are of the weights the layer now holds (PEFT: the merged base); cached sets hold old ones
        for other in list(self._adapters.values()):
            if other.handle.get("dora"):
                other.handle["norms"] = self._dora_norms(other.adapter, other.path)
        if any(la.handle.get("dora") for la in self._adapters.values()):
            with self._cache_lock:
                self._set_cache.clear()
        self._open_sessions()

    @staticmethod
    def _int4_ortvalue_source(values: np.ndarray) -> np.ndarray:
        """A buffer for an INT4 OrtValue: ORT takes the shape from the array and reads the packed
        bytes from its start, so the array has the logical shape and holds the nibbles up front."""
        from edge_lora.onnx_format.weight_quant import pack_int4

        packed = np.frombuffer(pack_int4(values), dtype=np.uint8)
        buffer = np.zeros(values.shape, dtype=np.uint8)
        buffer.reshape(-1)[: packed.size] = packed
        return buffer
