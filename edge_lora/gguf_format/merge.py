"""Merge an adapter into a GGUF base: dequantize each target weight, add the LoRA delta, requantize.

The result is a new GGUF with the same metadata and tensor types. ``precision`` says what a merged
tensor of a base below 8 bits becomes:

- ``"base"`` (default): the base's own type (q4_0, q4_1, q5_0, q5_1), so the merged model decodes at
  the base's speed. Rounded to the nearest grid point the adapter's delta, mostly under half a
  step, would vanish (merged about as far from unmerged as the base is); so the values are chosen
  on the base's own block grid with the adapter-aware rounding of :mod:`edge_lora.gguf_format.requant`.
  K-quants have no such encoder here and go to q8_0.
- ``"q8_0"``: q8_0 (f16 where a row does not split into 32-value blocks): the delta survives nearly
  whole (merged vs unmerged logit std 0.13 on the Qwen2.5-0.5B shape, q4_k_m), but q8_0 decodes at
  0.72x a q4_0 base (SmolLM2-135M shape).

Either way llama.cpp then runs the merged model with no per-token adapter cost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.file_write import write_gguf
from edge_lora.gguf_format.names import gguf_arch, gguf_module, to_gguf_rows
from edge_lora.gguf_format.quant import GRID_TYPES, block_grid, decode, encode, fit_grid, pack_codes
from edge_lora.gguf_format.requant import BlockGrid, round_to_grid

if TYPE_CHECKING:
    import gguf

_SKIP_KEYS = ("GGUF.", "general.architecture")  # the writer writes these itself
HEAD, EMBD = "output.weight", "token_embd.weight"
PRECISIONS = ("base", "q8_0")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EdgeLoraError(
            f"unknown merge precision {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}"
        )
    return precision


def write_merged_gguf(
    src: Path, dst: Path, config: ModelConfig, adapter: Adapter, scale: float, precision: str = "base"
) -> Path:
    import gguf

    check_precision(precision)

    try:
        reader = gguf.GGUFReader(os.fspath(src))
    except (ValueError, OSError) as err:
        raise EdgeLoraError(f"cannot read the GGUF base to merge into ({err})", path=src) from None
    deltas = {f"{gguf_module(m)}.weight": m for m in adapter.modules}
    found = {t.name for t in reader.tensors}
    # a tied base has no output.weight (llama.cpp reads token_embd for the head): the merge unties it, writing
    # output.weight as token_embd plus the delta, so the input embedding stays the base's
    untie = HEAD in deltas and HEAD not in found and EMBD in found
    missing = sorted(set(deltas) - found - ({HEAD} if untie else set()))
    if missing:
        raise EdgeLoraError(
            f"the GGUF base has no tensor {missing[0]!r} to merge into", path=src, hint="wrong base model?"
        )
    writer = gguf.GGUFWriter(None, gguf_arch(config))
    for field in reader.fields.values():
        if field.name.startswith(_SKIP_KEYS):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
        targets = [tensor.name] if tensor.name in deltas else []
        if untie and tensor.name == EMBD:
            targets = [HEAD]
        if tensor.name not in deltas:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=qtype)
        for name in targets:
            _add_merged(writer, name, tensor, qtype, config, adapter, deltas[name], scale, precision)
    return write_gguf(writer, dst, "merged GGUF")


def _add_merged(
    writer: gguf.GGUFWriter,
    name: str,
    tensor: gguf.ReaderTensor,
    qtype: gguf.GGMLQuantizationType,
    config: ModelConfig,
    adapter: Adapter,
    module: str,
    scale: float,
    precision: str,
) -> None:
    """``name`` = ``tensor`` with ``module`` merged in (DoRA's row rescale included, as in
    :meth:`Adapter.merged_weight`), requantized. Rows are in llama.cpp's order; DoRA's norms are per
    row, so permuting the magnitudes like the rows is all it needs."""
    from gguf import GGMLQuantizationType as T

    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml ne order -> numpy [rows, cols]
    weight = decode(tensor.data, qtype, shape)
    weight = weight + scale * to_gguf_rows(config, module, adapter.delta(module))
    magnitude = adapter.modules[module].magnitude
    if magnitude is not None:
        mag = to_gguf_rows(config, module, magnitude.astype(np.float64)[:, None])[:, 0]
        norm = np.linalg.norm(weight.astype(np.float64), axis=1)
        weight = (weight * (mag / np.maximum(norm, 1e-12))[:, None]).astype(np.float32)
    if precision == "base" and qtype.name in GRID_TYPES and name == tensor.name:
        step, offset, levels = block_grid(tensor.data, qtype, shape)
        step, offset, _ = fit_grid(weight, step, offset, qtype)
        codes = round_to_grid(weight, BlockGrid(step, offset, levels), adapter.modules[module].a)
        writer.add_tensor(name, pack_codes(codes, step, offset, qtype), raw_dtype=qtype)
        return
    out_type = qtype if qtype in (T.F32, T.F16, T.BF16, T.Q8_0) else T.Q8_0  # the types that keep the delta
    if out_type == T.Q8_0 and shape[-1] % 32:
        out_type = T.F16
    writer.add_tensor(name, encode(weight, out_type), raw_dtype=out_type)
