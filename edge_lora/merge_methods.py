"""Task-arithmetic merges of same-shaped tensors in numpy: PEFT's ``peft/utils/merge_utils.py`` rules.

Each function takes the tensors of the inputs that have them (one per input, stacked on a new first axis),
one weight per tensor and returns their merge:

    linear            sum_i w_i t_i
    magnitude_prune   the same, after each t_i keeps only its top ``density`` fraction by |value|
    ties              magnitude-pruned, then per element only the tensors agreeing with the elected sign
                      (sum of the pruned values, "total", or count of signs, "frequency"), averaged
    dare_linear       each t_i keeps each value with probability ``density``, rescaled by 1 / density
    dare_ties         that random pruning, then TIES' sign election and disjoint mean

The sign is elected on the unweighted tensors and the weights applied after, as PEFT does. Random masks
come from a caller's ``keep(i, shape)`` so that a seed, not a global generator, fixes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

KeepMask = Callable[[int, tuple[int, ...]], np.ndarray]  # (tensor index, shape) -> bool mask
MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def magnitude_pruned(t: np.ndarray, density: float) -> np.ndarray:
    """``t`` with all but its ``int(density * size)`` largest values by magnitude set to zero."""
    if density >= 1:
        return t
    k = int(density * t.size)
    flat = t.reshape(-1)
    mask = np.zeros(flat.shape, dtype=t.dtype)
    if k > 0:
        mask[np.argpartition(-np.abs(flat), k - 1)[:k]] = 1
    return t * mask.reshape(t.shape)


def randomly_pruned(t: np.ndarray, density: float, keep: np.ndarray) -> np.ndarray:
    """DARE: the kept values rescaled by ``1 / density`` so the expected value stays ``t``."""
    if density >= 1:
        return t
    return (t * keep.astype(t.dtype)) / np.asarray(density, dtype=t.dtype)


def majority_sign_mask(stacked: np.ndarray, method: str = "total") -> np.ndarray:
    sign = np.sign(stacked)
    magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    majority = np.where(magnitude >= 0, 1, -1).astype(stacked.dtype)
    return sign == majority


def disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    kept = (weighted * mask).sum(axis=0)
    return kept / np.maximum(mask.sum(axis=0), 1).astype(weighted.dtype)


def merge(
    method: str,
    tensors: Sequence[np.ndarray],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    sign_method: str = "total",
    keep: KeepMask | None = None,
) -> np.ndarray:
    """One of :data:`MERGES` over ``tensors`` (same shape, one dtype) with ``weights``."""
    dtype = tensors[0].dtype
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_pruned(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        if keep is None:
            raise ValueError(f"{method} needs a random keep mask")
        tensors = [randomly_pruned(t, density, keep(i, t.shape)) for i, t in enumerate(tensors)]
    elif method != "linear":
        raise ValueError(f"unknown merge {method!r}")
    stacked = np.stack(tensors)
    w = np.asarray(weights, dtype=dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method in ("ties", "dare_ties"):
        mask = majority_sign_mask(stacked, sign_method)  # elected before weighting, as PEFT does
        return disjoint_merge(stacked * w, mask).astype(dtype)
    return (stacked * w).sum(axis=0).astype(dtype)
