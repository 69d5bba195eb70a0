"""GGUF quant types: the quant names we accept, the file type and tensor types each one means (gguf-py's
own enums), and numpy encoding into and out of them.

Shared by the base exporter and the runtime's merge (dequantize, add, requantize). The names are
plain strings (the exporter checks them with no backend installed); ``gguf`` is imported lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    import gguf

# quant names done in numpy by gguf-py
NUMPY_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# K-quants done by llama.cpp's own quantizer, which takes the file type (llama_ftype) to make
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
QUANTS = NUMPY_QUANTS + K_QUANTS


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANTS:
        raise EdgeLoraError(f"unknown GGUF quantization {quant!r}", hint=f"choose one of {', '.join(QUANTS)}")
    return q


def file_type(quant: str) -> gguf.LlamaFileType:
    """``general.file_type`` for a quant name, which is also what llama.cpp's quantizer is asked to make
    (gguf-py names them ``ALL_F32`` and ``MOSTLY_<QUANT>``)."""
    from gguf import LlamaFileType

    return LlamaFileType["ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"]


def ggml_type(quant: str) -> gguf.GGMLQuantizationType:
    """The tensor type of a quant done in numpy (one of :data:`NUMPY_QUANTS`)."""
    from gguf import GGMLQuantizationType

    if quant not in NUMPY_QUANTS:
        raise KeyError(quant)
    return GGMLQuantizationType[quant.upper()]


# below 8 bits the output matrix is where quantization error hurts most (every logit reads it)
LOW_BIT_QUANTS = ("q4_0", "q4_1", "q5_0", "q5_1")


def tensor_type(
    gguf_name: str, shape: tuple[int, ...], quant: str, is_output: bool = False
) -> gguf.GGMLQuantizationType:
    """The type one tensor is stored in: norms, biases and rope factors stay F32 (llama.cpp wants
    them so); a matrix whose rows do not fill whole quant blocks falls back to F16. The output
    matrix (``output``, or ``token_embd`` on a tied base) of a 4/5-bit export stays at Q8_0, as
    llama.cpp's own quantizer keeps it above the base type."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if (
        len(shape) < 2
        or not gguf_name.endswith(".weight")
        or "_norm" in gguf_name
        or gguf_name.startswith("rope_")
    ):
        return T.F32
    wanted = ggml_type("q8_0" if is_output and quant in LOW_BIT_QUANTS else quant)
    block = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return T.F16 if wanted != T.F32 else T.F32
    return wanted


def encode(
    arr: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None = None
) -> np.ndarray:
    """A float array in the given GGML type, ready for ``GGUFWriter.add_tensor(raw_dtype=qtype)``.

    The symmetric 4/5-bit blocks (q4_0, q5_0) search each block's scale for the least weighted error
    (:mod:`edge_lora.block_search`, as llama.cpp's quantizer does with an imatrix), weighted by
    ``importance`` (``[cols]``, the mean squared input per column) when given; the other types are
    gguf-py's round-to-nearest."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == T.F32:
        return arr
    if qtype == T.F16:
        return arr.astype(np.float16)
    if qtype.name in SEARCHED_TYPES and arr.ndim == 2:
        return _searched(arr, qtype, importance)
    return quants.quantize(arr, qtype)


# symmetric block types whose scales are searched: name -> nmax (codes -nmax..nmax-1, stored + nmax)
SEARCHED_TYPES = {"Q4_0": 8, "Q5_0": 16}


def _searched(arr: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None) -> np.ndarray:
    from edge_lora.block_search import search_scales
    from edge_lora.importance import block_importance

    rows, cols = arr.shape
    nmax = SEARCHED_TYPES[qtype.name]
    scale, codes = search_scales(
        arr.reshape(rows, cols // _BLOCK, _BLOCK), nmax, block_importance(importance, cols, _BLOCK)
    )
    step = scale.astype(np.float16).astype(np.float64)  # stored as fp16, as ggml's block header
    stored = (codes.astype(np.int16) + nmax).astype(np.uint8).reshape(rows, cols)
    return pack_codes(stored, step, -nmax * step, qtype)


def decode(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor's data back to float32 numpy in numpy order (``[rows, cols]``)."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return np.asarray(data, dtype=np.float32).reshape(shape)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).astype(np.float32).reshape(shape)
    return quants.dequantize(np.asarray(data), qtype).astype(np.float32).reshape(shape)


# block types whose values sit on a per-block grid ``d * k + offset``: name -> (bits, stores a min ``m``)
GRID_TYPES = {"Q4_0": (4, False), "Q4_1": (4, True), "Q5_0": (5, False), "Q5_1": (5, True)}
_BLOCK = 32


def block_grid(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]) -> tuple:
    """``(step, offset, levels)`` of a GRID_TYPES tensor's blocks (``step``/``offset`` ``[rows, blocks]``
    float64): value = step * k + offset, k in 0..levels-1 (q4_0: offset = -8 step; q4_1: the block's min)."""
    bits, has_min = GRID_TYPES[qtype.name]
    blocks = _blocks(data, shape)
    step = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    levels = 1 << bits
    if has_min:
        offset = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    else:
        offset = -(levels // 2) * step
    return step, offset, levels


def fit_grid(
    weight: np.ndarray, step: np.ndarray, offset: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(step, offset, refit)``: the grid, with the blocks whose values ``weight`` takes outside it (by
    more than half a step) given the block parameters gguf-py's quantizer would pick for them (float16,
    as stored); ``refit`` ``[rows, blocks]`` marks those. A strong adapter's delta would otherwise be cut."""
    bits, has_min = GRID_TYPES[qtype.name]
    levels = 1 << bits
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // _BLOCK, _BLOCK)
    lo, hi = blocks.min(axis=-1), blocks.max(axis=-1)
    ends = (offset, offset + step * (levels - 1))  # q4_0/q5_0 steps are negative when the extreme is positive
    half = np.abs(step) / 2
    refit = (lo < np.minimum(*ends) - half) | (hi > np.maximum(*ends) + half)
    if has_min:
        new_step = ((hi - lo) / (levels - 1)).astype(np.float16).astype(np.float64)
        new_offset = lo.astype(np.float16).astype(np.float64)
    else:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
        new_step = (extreme / -(levels // 2)).astype(np.float16).astype(np.float64)
        new_offset = -(levels // 2) * new_step
    return np.where(refit, new_step, step), np.where(refit, new_offset, offset), refit


def pack_codes(
    codes: np.ndarray, step: np.ndarray, offset: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> np.ndarray:
    """Codes ``k`` (``[rows, cols]`` uint8) with their blocks' ``step`` (``d``) and, for the types that
    store one, ``offset`` (``m``), both exact float16 values: the raw bytes of the tensor."""
    bits, has_min = GRID_TYPES[qtype.name]
    rows, cols = codes.shape
    k = codes.reshape(rows, cols // _BLOCK, 2, _BLOCK // 2)
    parts = [step.astype(np.float16)[..., None].view(np.uint8)]
    if has_min:
        parts.append(offset.astype(np.float16)[..., None].view(np.uint8))
    if bits == 5:  # the fifth bits of the 32 values, little-endian, before the nibbles
        high = (codes.reshape(rows, cols // _BLOCK, _BLOCK) >> 4) & 1
        parts.append(np.packbits(high, axis=-1, bitorder="little"))
    parts.append((k[..., 0, :] & 0x0F) | ((k[..., 1, :] & 0x0F) << 4))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _blocks(data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = shape
    raw = np.asarray(data).view(np.uint8).reshape(rows, -1)
    return raw.reshape(rows, cols // _BLOCK, raw.shape[1] // (cols // _BLOCK))
