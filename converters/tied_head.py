"""Is a tensor the base's tied embedding table?

For PEFT's ``lm_head.base_layer.weight`` (see converters/peft.py).

From a model directory the table is compared exactly (or at half precision, where the user's PEFT
model ran in fp16/bf16). From a bundle alone (``export --add-adapter``) the ONNX export's own copy
is used: float copies compared at their precision, a quantized copy by quantizing the saved tensor
the same way and comparing the stored values (the quantizer is deterministic).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_lora.bundle import Bundle
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import names as onnx_names
from edge_lora.onnx_format.layout import read_layout

TABLE = "model.embed_tokens.weight"


def _bf16(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def same_table(saved: np.ndarray, table: np.ndarray) -> bool:
    """Equal, or equal once both are rounded to fp16 or to bf16 (a PEFT model run in half precision)."""
    saved, table = np.asarray(saved, np.float32), np.asarray(table, np.float32)
    if saved.shape != table.shape:
        return False
    return bool(
        np.array_equal(saved, table)
        or np.array_equal(saved.astype(np.float16), table.astype(np.float16))
        or np.array_equal(_bf16(saved), _bf16(table))
    )


def model_dir_check(md: ModelDir) -> Callable[[np.ndarray], bool]:
    return lambda saved: same_table(saved, md.get(TABLE))


def bundle_check(bundle: Bundle) -> Callable[[np.ndarray], bool] | None:
    """A check against the bundle's ONNX copy of the table; None when the bundle has no ONNX base."""
    entries = bundle.backends.get("onnx") or []
    if not entries:
        return None

    def check(saved: np.ndarray) -> bool:
        from edge_lora.onnx_format.weight_store import WeightStore

        entry = entries[0]
        folder = entry["model"].rsplit("/", 1)[0] + "/" if "/" in entry["model"] else ""
        layout = read_layout(bundle.require(folder + onnx_names.LAYOUT_FILE))
        store = WeightStore(layout, bundle.require(folder + layout["data_file"]))
        info = layout["tensors"].get(TABLE)
        if info is not None and info["dtype"] in ("float32", "float16"):
            stored = store.tensor(TABLE)
            return saved.shape == stored.shape and bool(np.array_equal(saved.astype(stored.dtype), stored))
        if "lm_head" not in layout["weights"]:
            return False
        fresh = WeightStore(layout, store.data_path)
        requantized = fresh.requantize("lm_head", np.asarray(saved, np.float32))
        return all(
            np.array_equal(np.asarray(value), np.asarray(store.tensor(name)))
            for name, value in requantized.items()
        )

    return check
