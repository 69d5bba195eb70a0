"""Block quantization of linear weights in ONNX Runtime's layouts, numpy only.

The exporter writes these layouts and the runtime reads them back to merge an adapter into a
quantized base (dequantize, add, requantize), so both sides share this one file.

MatMulNBits (com.microsoft): a weight ``W [N, K]`` (out, in) is cut into blocks of
``block_size`` along K. ``packed [N, k_blocks, block_size * bits / 8]`` uint8 (4-bit: low
nibble first), ``scales [N * k_blocks]`` float32, ``zero_points`` uint8 packed the same way per
row (``[N * ceil(k_blocks * bits / 8)]``). ``w = (q - zp) * scale``. 8 bits are symmetric around
128. 4 bits are symmetric around 8 (llama.cpp's q4_0 scheme, as ONNX Runtime GenAI's builder
exports) or asymmetric (a zero point per block: better accuracy, but MatMulNBits then reads and
subtracts zero points, 15-40% slower per layer on the benchmark CPU). A symmetric weight may
leave its zero points out of the graph: MatMulNBits' default is the same 8 / 128.

QDQ (standard DequantizeLinear, the portable graph): int8 per output channel, symmetric, stored
as ``W^T [K, N]`` with ``scales [N]`` on axis 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BLOCK_SIZE = 32


@dataclass
class NBitsWeight:
    packed: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray | None  # uint8 [N * zp_cols]; None = the symmetric default (8 or 128)
    bits: int
    block_size: int
    k: int  # true in_features (the last block may be padded)

    @property
    def n(self) -> int:
        return self.packed.shape[0]


def quantize_nbits(
    weight: np.ndarray,
    bits: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = False,
    importance: np.ndarray | None = None,
) -> NBitsWeight:
    """``W [N, K]`` float -> MatMulNBits tensors (8 bits are always symmetric).

    4-bit blocks search each block's scale (symmetric: llama.cpp's q4_0 search) or scale and zero point
    (asymmetric) for the least weighted error (:mod:`edge_lora.block_search`), weighted by
    ``importance`` (``[K]``, the mean squared input per column) when given."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    w = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    w[:, :k] = weight
    w = w.reshape(n, k_blocks, block_size)
    levels = (1 << bits) - 1
    if bits == 4 and symmetric:  # q4_0's grid: codes -8..7 around 8, the scale searched
        scale, codes = _searched_blocks(w, weight, importance)
        zp = np.full((n, k_blocks), 8, dtype=np.uint8)
        return NBitsWeight(
            packed=_pack((codes + 8).astype(np.uint8), bits),
            scales=scale.reshape(-1),
            zero_points=_pack(zp, bits).reshape(-1),
            bits=bits,
            block_size=block_size,
            k=k,
        )
    elif bits == 4:  # a zero point per block; scale and zero point searched
        from edge_lora.block_search import search_zero_points
        from edge_lora.importance import block_importance

        sigma2 = np.mean(np.square(weight.astype(np.float32)), axis=1)
        scale, zero, codes = search_zero_points(
            w, levels + 1, block_importance(importance, k, block_size), sigma2
        )
        return NBitsWeight(
            packed=_pack(codes, bits),
            scales=scale.reshape(-1),
            zero_points=_pack(zero.astype(np.uint8), bits).reshape(-1),
            bits=bits,
            block_size=block_size,
            k=k,
        )
    else:
        amax = np.abs(w).max(axis=2)
        scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
        zp = np.full((n, k_blocks), 128, dtype=np.uint8)
    q = np.clip(np.round(w / scale[:, :, None]) + zp[:, :, None], 0, levels).astype(np.uint8)
    return NBitsWeight(
        packed=_pack(q, bits),
        scales=scale.reshape(-1),
        zero_points=_pack(zp, bits).reshape(-1),
        bits=bits,
        block_size=block_size,
        k=k,
    )


def dequantize_nbits(q: NBitsWeight) -> np.ndarray:
    """MatMulNBits tensors -> ``W [N, K]`` float32."""
    n = q.n
    k_blocks = q.packed.shape[1]
    values = _unpack(q.packed.reshape(n, -1), q.bits, k_blocks * q.block_size).reshape(
        n, k_blocks, q.block_size
    )
    if q.zero_points is None:
        zp = np.full((n, k_blocks), 1 << (q.bits - 1), dtype=np.uint8)
    else:
        zp = _unpack(q.zero_points.reshape(n, -1), q.bits, k_blocks)
    scale = q.scales.reshape(n, k_blocks)
    w = (values.astype(np.float32) - zp[:, :, None]) * scale[:, :, None]
    return w.reshape(n, -1)[:, : q.k]


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 values (< 2**bits) along the last axis; 4-bit: element 2i low nibble, 2i+1 high."""
    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]


def quantize_int8_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W [N, K]`` -> ``(W^T as int8 [K, N], scales [N])`` for DequantizeLinear on axis 1."""
    amax = np.abs(weight).max(axis=1)
    scale = np.where(amax == 0, 1.0, amax / 127.0).astype(np.float32)
    q = np.clip(np.round(weight / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale


def dequantize_int8_channel(q_t: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8_channel`: ``W [N, K]`` float32."""
    return (q_t.astype(np.float32) * scales[None, :]).T


def quantize_int4_block_t(
    weight: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``W [N, K]`` -> ``(W^T as int4 values in int8 [K, N], scales [ceil(K / block), N])``.

    Symmetric blocks along K, for DequantizeLinear(axis=0, block_size) on an INT4 initializer, each
    block's scale searched as :func:`quantize_nbits` does (``importance`` ``[K]`` weighs it).
    Computed in ``W``'s own row order and transposed once as int8 at the end: on a real vocabulary
    (Qwen2.5's 151936 x 896 head) working on the float transpose was 3-4x slower.
    """
    n, k = weight.shape
    k_blocks = -(-k // block_size)
    padded = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    blocks = padded.reshape(n, k_blocks, block_size)
    scale, codes = _searched_blocks(blocks, weight, importance)
    q = codes.reshape(n, -1)[:, :k]
    return np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T)


def _searched_blocks(
    blocks: np.ndarray, weight: np.ndarray, importance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit blocks (codes -8..7) with searched scales; an all-zero block gets scale 1."""
    from edge_lora.block_search import search_scales
    from edge_lora.importance import block_importance

    _, k_blocks, block_size = blocks.shape
    sigma2 = np.mean(np.square(weight.astype(np.float32)), axis=1)  # over the true columns
    scale, codes = search_scales(blocks, 8, block_importance(importance, weight.shape[1], block_size), sigma2)
    return np.where(scale == 0, 1.0, scale).astype(np.float32), codes


def dequantize_int4_block_t(q_t: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """Inverse of :func:`quantize_int4_block_t`: ``W [N, K]`` float32."""
    k = q_t.shape[0]
    return (q_t.astype(np.float32) * np.repeat(scales, block_size, axis=0)[:k]).T


def pack_int4(values: np.ndarray) -> bytes:
    """Signed int4 values (int8 holding -8..7), row-major, two per byte, low nibble first (ONNX INT4)."""
    flat = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    return _pack(flat, 4).tobytes()


def unpack_int4(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    nibbles = _unpack(raw.reshape(-1), 4, count).astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)
