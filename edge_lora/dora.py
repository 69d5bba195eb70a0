"""DoRA at inference, unmerged: the per-output-channel factor ``m / ||W + c B A||_row``.

PEFT (peft/tuners/lora/dora.py, variants.DoraLinearVariant) computes for one adapter with scaling
``c = user_scale * alpha / r`` (``set_scale`` scales ``c``, so the norm sees the scaled delta)::

    y = result + (d - 1) * (result - bias) + d * c * B A x        d = m / ||W + c B A||_row (detached)

where ``result`` is everything the layer produced before this adapter: the base, and with several
active adapters the branches of the adapters before it. Unrolled over adapters ``1..n`` in PEFT's
active order (``d_k = 1`` for plain LoRA) that is::

    y - bias = (prod_k d_k) W x + sum_i (prod_{k >= i} d_k) c_i B_i A_i x

so a graph needs one per-channel factor on the base matmul (``D = prod_k d_k``, the ``dora_scale``
input) and each adapter's B rows folded with the factors of itself and the adapters after it.

The norm needs the base weight only through ``||w||^2``, ``W A^T`` and ``A A^T`` (all small), taken
once when the adapter is added; any user scale then costs ``O(out * r^2)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from edge_lora.adapter import Adapter, LoraWeights


@dataclass
class DoraNorm:
    """What one DoRA module needs of its base weight:
    ``||w_o||^2 [out]``, ``W A^T [out, r]``, ``A A^T [r, r]``."""

    w2: np.ndarray
    wa: np.ndarray
    aa: np.ndarray


def prepare_norms(adapter: Adapter, weight_of: Callable[[str], np.ndarray]) -> dict[str, DoraNorm]:
    """``{module: DoraNorm}`` for the adapter's DoRA modules;
    ``weight_of(module)`` is the base ``W [out, in]``."""
    norms = {}
    for module, w in adapter.modules.items():
        if w.magnitude is None:
            continue
        # float32 products (a row's sum of squares keeps ~1e-6 relative error), float64 from here on
        weight = np.asarray(weight_of(module), dtype=np.float32)
        a = w.a.astype(np.float32)
        norms[module] = DoraNorm(
            w2=np.einsum("oi,oi->o", weight, weight).astype(np.float64),
            wa=(weight @ a.T).astype(np.float64),
            aa=(a @ a.T).astype(np.float64),
        )
    return norms


def factor(w: LoraWeights, norm: DoraNorm, c: float) -> np.ndarray:
    """``m / ||W + c B A||_row`` ``[out]`` float64, for the delta's full scaling ``c``."""
    b = w.b.astype(np.float64)
    sq = norm.w2 + 2.0 * c * np.einsum("or,or->o", b, norm.wa) + c * c * np.einsum("or,or->o", b @ norm.aa, b)
    return w.magnitude.astype(np.float64) / np.sqrt(np.maximum(sq, 1e-24))


def chain(
    pieces: list[tuple[LoraWeights, float, np.ndarray | None]], out_f: int
) -> tuple[list[np.ndarray | None], np.ndarray | None]:
    """One module's adapters in PEFT's order, each ``(weights, c, d or None)``: the per-channel factor to
    fold into each adapter's B (None: none) and the factor ``D`` on the base output (None: no DoRA)."""
    if all(d is None for _, _, d in pieces):
        return [None] * len(pieces), None
    folds: list[np.ndarray | None] = [None] * len(pieces)
    running = np.ones(out_f, np.float64)
    # suffix products: adapter i is rescaled by its own factor and those of the adapters after it
    for i in range(len(pieces) - 1, -1, -1):
        d = pieces[i][2]
        if d is not None:
            running = running * d
        folds[i] = running.copy()
    return folds, running


def require_norms(norms: dict | None, adapter_name: str = "adapter") -> dict:
    if norms is None:
        raise EdgeLoraError(
            f"{adapter_name} is DoRA, and its base weight norms were not prepared",
            hint="add the adapter through the engine (add_adapter), which prepares them",
        )
    return norms
