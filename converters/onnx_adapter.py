"""An adapter as an ``.onnx_adapter`` file: the graph's LoRA inputs (one A^T / B^T pair per fused
group it touches) with the scale folded into B, and for DoRA each group's ``dora_scale``.

ONNX Runtime's ``LoraAdapter`` and onnxruntime-genai's ``Adapters`` load it and activate it per
run; names and layouts are :func:`edge_lora.onnx_format.lora_feeds.stack_lora`'s, the same feeds the runtime
builds itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.atomic import atomic_path
from edge_lora.config import ModelConfig
from edge_lora.dora import prepare_norms
from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format import lora_feeds, names

LORA_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def export_onnx_adapter(
    adapter: Adapter,
    config: ModelConfig,
    out_path: Path,
    scale: float = 1.0,
    lora_dtype: str = "float32",
    weights: Callable[[str], np.ndarray] | None = None,
) -> Path:
    """``weights(module)`` gives the base ``W [out, in]``, needed by a DoRA adapter only: its file
    also holds each touched group's ``dora_scale``, computed from those weights."""
    import onnxruntime as ort

    adapter.check_fits(config)
    norms = None
    if adapter.dora:
        if weights is None:
            raise EdgeLoraError(
                "a DoRA adapter's .onnx_adapter needs the base weights for its norms",
                path=out_path,
                hint="export it with `edge-lora export`, which passes them",
            )
        norms = [prepare_norms(adapter, weights)]
    feeds = lora_feeds.stack_lora(
        [(adapter, scale)], names.lora_slots(config), LORA_NUMPY_DTYPES[lora_dtype], norms
    )
    # new tokens' rows as the graph's inputs (layout 4 on), so ORT's LoraAdapter and genai see them too
    feeds.update(
        lora_feeds.added_rows_feeds(adapter.embed_rows, adapter.head_rows, config.tie_word_embeddings)
    )
    # every group the adapter leaves out as rank-1 zeros: onnxruntime-genai on WebGPU would otherwise
    # run the graph's zero-size defaults, which crash there (135M: +1.1 MB on a 20 MB adapter)
    feeds.update(lora_feeds.zero_pads(names.lora_slots(config), LORA_NUMPY_DTYPES[lora_dtype], feeds))
    out_path = Path(out_path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    # set_parameters keeps only the C-side OrtValues: the arrays must outlive export_adapter
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
    fmt.set_parameters(values)
    try:
        with atomic_path(out_path) as tmp:
            fmt.export_adapter(str(tmp))
    except RuntimeError as err:
        raise EdgeLoraError(
            f"ONNX Runtime could not write the adapter ({str(err).splitlines()[0][:160]})", path=out_path
        ) from None
    del values, feeds
    return out_path
