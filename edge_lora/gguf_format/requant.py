"""Requantize a merged weight onto its base's own 4/5-bit grid without losing the adapter.

A merged weight ``W + delta`` rounded to the nearest point of a q4_0 grid comes back as the base:
the delta is mostly under half a grid step (measured: merged vs unmerged logits as far apart as
base vs unmerged). So the rounding here keeps the base's block scales (an unchanged weight lands
exactly on its old value) and chooses each value so that the rounding error stays out of the
adapter's input subspace: it minimises ``|e|^2 + strength * |e Q|^2`` per row, ``e`` the rounding
error and ``Q`` an orthonormal basis of the LoRA A rows (the inputs the adapter reacts to), with
Babai's nearest-plane rule on the factor ``H = L^T D L`` of ``I + strength * Q Q^T`` (the rule
GPTQ applies with a data Hessian), applied to groups of ``GROUP`` columns. ``H`` is identity plus
rank r, so ``L``'s row j below the diagonal is ``g_j^T V`` and the feedback of every earlier column
is one r-vector per row: the whole pass costs O(rows x cols x r).

Measured on a 1536x576 q4_0 matrix with a random r16 adapter (delta about half a grid step), rounding
error over the adapter's effect: inputs in the adapter's subspace 0.115 nearest, 0.034 here;
isotropic inputs 0.546 nearest, 0.561 here (the base's own q4_0 error: 0.532). A random adapter on a
random model sees isotropic inputs (its merged logits: 0.52 of the adapter's effect off, either way);
the more a trained adapter's inputs lie in the span of its A rows, the more of its effect this keeps
(3x less error there; not measured on trained adapters yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockGrid:
    """A row-major block grid: value = step * k + offset, k in 0..levels-1, per block of ``block`` values
    (q4_0: offset = -8 step, levels 16; q5_0: -16 step, 32; q4_1 / q5_1: offset = the block's min)."""

    step: np.ndarray  # [rows, cols // block]
    offset: np.ndarray  # [rows, cols // block]
    levels: int
    block: int = 32


# weight of the adapter subspace's error against the rest: 10 cut that error 3.4x for +3% elsewhere;
# 100 cut it 6x for +8% (a 1536x576 q4_0 matrix, random r16 adapter)
DEFAULT_STRENGTH = 10.0
GROUP = 16  # columns rounded together, their feedback to each other left out: the same accuracy as 1
# (exact Babai) at strength 10, with a 16x shorter Python loop


def subspace_feedback(a: np.ndarray, strength: float, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """``(v, g)``, both ``[cols, r]``: column j's direction in the scaled adapter subspace and its
    feedback gain (``L[j, k] = g_j . v_k`` for k before j's group). ``a``: the adapter's ``A``
    ``[r, cols]``; ``cols`` a multiple of ``group``."""
    a64 = a.astype(np.float64)
    gram = a64 @ a64.T
    # orthonormal rows through the r x r Cholesky factor (LAPACK's QR of a tall matrix took 100x as long
    # here); the ridge keeps a rank-deficient A (zero rows) factorable
    chol = np.linalg.cholesky(gram + 1e-9 * max(np.trace(gram), 1e-30) * np.eye(len(gram)))
    basis = np.linalg.solve(chol, a64).T  # [cols, r]
    v = np.sqrt(strength) * basis
    cols, r = v.shape
    vg = v.reshape(cols // group, group, r)
    outer = np.einsum("bsr,bst->brt", vg, vg)
    after = np.cumsum(outer[::-1], axis=0)[::-1] - outer  # sum over later groups of v_k v_k^T
    p = np.repeat(np.linalg.inv(np.eye(r) + after), group, axis=0)  # the Schur complements' low-rank part
    pv = np.einsum("jab,jb->ja", p, v)
    g = pv / (1.0 + np.einsum("ja,ja->j", v, pv))[:, None]
    return v, g


def round_to_grid(
    weight: np.ndarray, grid: BlockGrid, a: np.ndarray | None, strength: float = DEFAULT_STRENGTH
) -> np.ndarray:
    """The codes ``k`` (uint8 ``[rows, cols]``) of ``weight`` on ``grid``; with ``a``, adapter-aware
    (module docstring); without, nearest."""
    rows, cols = weight.shape
    top = float(grid.levels - 1)
    inv = 1.0 / np.where(grid.step == 0, 1.0, grid.step)  # per block: a zero block stays at its offset
    if a is None or not a.size or cols % GROUP or grid.block % GROUP:
        step, offset, inv = (np.repeat(x, grid.block, axis=1) for x in (grid.step, grid.offset, inv))
        return np.clip(np.rint((weight - offset) * inv), 0, top).astype(np.uint8)
    v, g = subspace_feedback(a, strength)
    codes = np.empty((rows, cols), np.uint8)
    state = np.zeros((rows, v.shape[1]))  # sum over earlier columns of error_k * v_k, per row
    for c0 in range(0, cols, GROUP):
        c, b = slice(c0, c0 + GROUP), c0 // grid.block  # a group lies inside one quant block
        d, off, di = grid.step[:, b, None], grid.offset[:, b, None], inv[:, b, None]
        k = np.clip(np.rint((weight[:, c] + state @ g[c].T - off) * di), 0, top)
        codes[:, c] = k
        state += (weight[:, c] - (d * k + off)) @ v[c]
    return codes
