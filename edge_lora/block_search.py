"""Symmetric block quantization that searches each block's scale for the least weighted error.

Round-to-nearest with the scale set by the block's largest value (``d = max / -8``) wastes levels on
one outlier and rounds every other value coarsely. llama.cpp's quantizer (``make_qx_quants`` in
ggml-quants.c, used for q4_0 whenever importance weights are given) tries 19 scales around that one,
fits the least-squares scale for each rounding and keeps the one with the smallest weighted squared
error. This is the same search, vectorised over all blocks of a tensor in numpy.

Weights per value: ``importance[col] * sqrt(sigma2 + w^2)`` as llama.cpp forms them, where
``importance`` is the mean squared activation of the input column (from calibration text: the
"imatrix") or all ones without calibration, and ``sigma2`` the row's mean square. Both formats that
hold symmetric 4-bit blocks (GGUF q4_0: fp16 scale; ONNX MatMulNBits int4: fp32 scale) call it.
"""

from __future__ import annotations

import numpy as np

SEARCH_STEPS = tuple(0.1 * s for s in range(-9, 10) if s)  # llama.cpp's offsets of nmax, -0.9..+0.9


def search_scales(
    blocks: np.ndarray, nmax: int, importance: np.ndarray | None = None, sigma2: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(scale [rows, nb], codes [rows, nb, bs] int8 in -nmax..nmax-1)`` for ``blocks [rows, nb, bs]``.

    ``importance [nb, bs]`` weighs the input columns (None = equal); ``sigma2 [rows]`` is the row's
    mean square (None = computed from ``blocks``). Value = scale * code; an all-zero block gets 0."""
    x = blocks.astype(np.float32, copy=False)
    if sigma2 is None:
        sigma2 = np.mean(np.square(x), axis=(1, 2))
    parts = [_search_rows(x[r], nmax, importance, sigma2[r]) for r in _row_chunks(x)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _row_chunks(x: np.ndarray) -> list[slice]:
    """Row ranges of ~64k values: the 19 passes over a chunk stay in the CPU's cache (4-5x faster than
    whole tensors)."""
    rows = max(1, CHUNK_VALUES // max(1, x.shape[1] * x.shape[2]))
    return [slice(start, start + rows) for start in range(0, x.shape[0], rows)]


CHUNK_VALUES = 1 << 16


def _search_rows(
    x: np.ndarray, nmax: int, importance: np.ndarray | None, sigma2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    weight = np.sqrt(sigma2[:, None, None] + np.square(x))
    if importance is not None:
        weight *= importance[None].astype(np.float32)
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    safe_peak = np.where(peak == 0, 1.0, peak)
    best_scale, best_codes, best = _fit(x, weight, -nmax / safe_peak, nmax)
    for step in SEARCH_STEPS:
        scale, codes, gain = _fit(x, weight, -(nmax + step) / safe_peak, nmax)
        better = gain > best
        best = np.where(better, gain, best)
        best_scale = np.where(better, scale, best_scale)
        best_codes = np.where(better[..., None], codes, best_codes)
    zero = peak == 0
    best_scale = np.where(zero, 0.0, best_scale)
    best_codes = np.where(zero[..., None], 0, best_codes)
    return best_scale.astype(np.float32), best_codes.astype(np.int8)


def _fit(
    x: np.ndarray, weight: np.ndarray, iscale: np.ndarray, nmax: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes from rounding at ``iscale``, the weighted least-squares scale for those codes, and
    ``scale * sumlx``: how much that fit removes from the weighted squared error (larger is better)."""
    codes = np.clip(np.rint(x * iscale[..., None]), -nmax, nmax - 1)
    wl = weight * codes
    suml2 = np.sum(wl * codes, axis=-1)
    sumlx = np.sum(wl * x, axis=-1)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    return scale, codes, scale * sumlx


ASYM_STEPS = tuple(0.1 * s for s in range(-10, 11))  # offsets of the level count, as make_qkx2_quants


def search_zero_points(
    blocks: np.ndarray, levels: int, importance: np.ndarray | None = None, sigma2: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scale [rows, nb], zero_point [rows, nb] int, codes [rows, nb, bs] uint8 in 0..levels-1)``:
    value = scale * (code - zero_point), the zero point an integer (MatMulNBits' layout).

    Each block tries 21 ranges around ``(max - min) / (levels - 1)`` (llama.cpp's make_qkx2_quants
    sweep); for each, the integer zero point that puts the block's min on the grid, the codes by
    rounding, then the weighted least-squares scale for those codes. The smallest weighted error wins."""
    x = blocks.astype(np.float32, copy=False)
    if sigma2 is None:
        sigma2 = np.mean(np.square(x), axis=(1, 2))
    parts = [_zero_point_rows(x[r], levels, importance, sigma2[r]) for r in _row_chunks(x)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _zero_point_rows(
    x: np.ndarray, levels: int, importance: np.ndarray | None, sigma2: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    weight = np.sqrt(sigma2[:, None, None] + np.square(x))
    if importance is not None:
        weight *= importance[None].astype(np.float32)
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    span = np.where(hi > lo, hi - lo, 1.0)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best = (np.ones_like(lo), np.zeros(lo.shape, np.int32), np.zeros(x.shape, np.uint8))
    for step in ASYM_STEPS:
        scale = span / (levels - 1 + step)
        zero = np.clip(np.rint(-lo / scale), 0, levels - 1)
        codes = np.clip(np.rint(x / scale[..., None]) + zero[..., None], 0, levels - 1)
        centred = codes - zero[..., None]
        wl = weight * centred
        suml2 = np.sum(wl * centred, axis=-1)
        fit = np.where(suml2 > 0, np.sum(wl * x, axis=-1) / np.where(suml2 > 0, suml2, 1.0), scale)
        fit = np.where(fit > 0, fit, scale)
        err = np.sum(weight * np.square(fit[..., None] * centred - x), axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (
            np.where(better, fit, best[0]),
            np.where(better, zero, best[1]).astype(np.int32),
            np.where(better[..., None], codes, best[2]).astype(np.uint8),
        )
    return best[0].astype(np.float32), best[1], best[2]
