"""The LoRA feeds of an ONNX decoder: one A^T / B^T pair per fused group, built from adapters.

The exporter writes them into ``.onnx_adapter`` files and the runtime feeds them per request; both
build them here so the two agree byte for byte (see :mod:`.names` for the group layout).
"""

from __future__ import annotations

import mmap
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import DTypeLike

from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format.names import (
    ADDED_EMBED_ROWS,
    ADDED_HEAD_ROWS,
    dora_scale,
    group_slots,
    lora_a,
    lora_b,
)
from edge_lora.targets import LM_HEAD

if TYPE_CHECKING:
    from edge_lora.adapter import Adapter, LoraWeights
    from edge_lora.dora import DoraNorm

    # one module's adapters: (weights, folded scale, DoRA factor or None)
    Pieces = dict[str, list[tuple[LoraWeights, float, np.ndarray | None]]]


def zero_pads(
    slots: dict[str, tuple[int, int]], dtype: DTypeLike = np.float32, skip: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """Rank-1 zero A^T / B^T for every group whose inputs are not in ``skip``: the same result as the
    graph's rank-0 defaults, for WebGPU, which crashes on a zero-size tensor (our GPU path and
    onnxruntime-genai's both feed these instead of relying on the defaults)."""
    pads = {}
    for group, members in group_slots(slots).items():
        if lora_a(group) not in skip:
            pads[lora_a(group)] = np.zeros((members[0][2], 1), dtype)
            pads[lora_b(group)] = np.zeros((1, sum(out_f for _, out_f, _ in members)), dtype)
    return pads


def stack_lora(
    parts: list[tuple[Adapter, float]],
    slots: dict[str, tuple[int, int]],
    dtype: DTypeLike = np.float32,
    norms: list[dict[str, DoraNorm] | None] | None = None,
) -> dict[str, np.ndarray]:
    """Feeds for several adapters at once: one A^T / B^T pair per group, every rank block side by side.

    ``parts`` is ``[(Adapter, scale), ...]``; each adapter's own ``alpha / r`` times ``scale`` is
    folded into its B rows, so ``x A^T B^T`` is the weighted sum of the adapters' deltas. Modules
    an adapter leaves out of a group keep zero columns in B. Groups no adapter touches are left
    out: the session uses their rank-0 defaults.

    DoRA adapters need ``norms`` (aligned with ``parts``: :func:`edge_lora.dora.prepare_norms` of
    each, None for plain ones); their groups also get ``<group>.dora_scale [out]`` (float32), the
    factor on the base output, and the DoRA factors are folded into B in ``parts``' order as PEFT
    applies its active adapters (see :mod:`edge_lora.dora`).
    """
    pieces = _pieces(parts, slots, norms)
    groups = {g: m for g, m in group_slots(slots).items() if any(module in pieces for module, _, _ in m)}
    shapes = []
    for members in groups.values():
        rank = sum(w.rank for module, _, _ in members for w, _, _ in pieces.get(module, ()))
        shapes += [(members[0][2], rank), (rank, sum(out_f for _, out_f, _ in members))]
    views = iter(zeroed_views(shapes, dtype))
    feeds = {}
    for group, members in groups.items():
        a, b = feeds[lora_a(group)], feeds[lora_b(group)] = next(views), next(views)
        scale = _fill_group(members, pieces, a, b)
        if scale is not None:
            feeds[dora_scale(group)] = scale
    return feeds


def zeroed_views(shapes: list[tuple[int, int]], dtype: DTypeLike, align: int = 64) -> list[np.ndarray]:
    """Zeroed arrays of ``shapes``, each a view of ONE allocation starting on an ``align``-byte
    boundary. A set's feeds are tens of MB in a few hundred arrays: allocated one by one, each comes
    fresh from the kernel 4 KB page by page, and those page faults cost 3x the copying (SmolLM2-135M
    r16); one block is mapped whole (:func:`zeroed_block`)."""
    dtype = np.dtype(dtype)
    step = max(1, align // dtype.itemsize)
    offsets, total = [], 0
    for rows, cols in shapes:
        offsets.append(total)
        total += -(-rows * cols // step) * step
    flat = zeroed_block(total, dtype)
    return [flat[o : o + r * c].reshape(r, c) for o, (r, c) in zip(offsets, shapes)]


POPULATE_FROM = 4 << 20  # bytes: smaller blocks come from the allocator's own free memory


def zeroed_block(n: int, dtype: DTypeLike) -> np.ndarray:
    """``n`` zeros of ``dtype``; a large block is an anonymous mapping whose pages the kernel fills in
    one call (``MAP_POPULATE``, Linux), then marked for huge pages that khugepaged assembles later.
    ``np.zeros`` asks for huge pages at the first touch instead, and where the kernel has none free it
    compacts memory then and there: adding a SmolLM2-135M adapter beside others took 31 or 99-167 ms by
    that luck (81 ms of it in the kernel for 29 MB), 33-36 ms with the mapping filled at once. The cost:
    an add right after a remove no longer reuses the memory the allocator kept (20 -> 27-29 ms)."""
    dtype = np.dtype(dtype)
    nbytes = n * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if nbytes < POPULATE_FROM or populate is None:
        return np.zeros(n, dtype)
    block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        block.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(block, dtype)  # the array keeps the mapping alive; unmapped with it


def _pieces(
    parts: list[tuple[Adapter, float]],
    slots: dict[str, tuple[int, int]],
    norms: list[dict[str, DoraNorm] | None] | None = None,
) -> Pieces:
    """``{module: [(LoraWeights, folded scale, DoRA factor or None), ...]}`` in the order of ``parts``,
    after the checks."""
    from edge_lora.dora import factor, require_norms

    pieces: Pieces = {}
    for i, (adapter, scale) in enumerate(parts):
        for module, w in adapter.modules.items():
            if module not in slots:
                hint = (
                    "this bundle's tied-embedding base has no lm_head slot: re-export it with this edge-lora"
                    if module == LM_HEAD
                    else "wrong base model?"
                )
                raise EdgeLoraError(
                    f"adapter module {module!r} has no LoRA slot in this ONNX model", hint=hint
                )
            c = scale * adapter.scale(module)
            d = None
            if w.magnitude is not None:
                d = factor(w, require_norms(norms[i] if norms else None)[module], c)
            pieces.setdefault(module, []).append((w, c, d))
    return pieces


def added_rows_feeds(embed: np.ndarray | None, head: np.ndarray | None, tied: bool) -> dict[str, np.ndarray]:
    """The graph's new-token tables for ``[n, hidden]`` rows (none when there are no new tokens)."""
    if embed is None or not len(embed):
        return {}
    n, hidden = embed.shape
    table = np.zeros((n + 1, hidden + 1), np.float32)
    table[1:, :hidden], table[1:, hidden] = embed, 1.0
    feeds = {ADDED_EMBED_ROWS: table}
    if not tied:
        zero = np.zeros((1, hidden), np.float32)
        feeds[ADDED_HEAD_ROWS] = np.concatenate([zero, np.asarray(head, np.float32)])
    return feeds


def split_added_ids(ids: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, added_token_index)`` for ids that may lie past the base vocabulary."""
    index = np.where(ids >= vocab, ids - (vocab - 1), 0)
    return np.minimum(ids, vocab - 1), index


def _fill_group(
    members: list[tuple[str, int, int]], pieces: Pieces, a: np.ndarray, b: np.ndarray
) -> np.ndarray | None:
    """Fill one group's A^T ``[in, R]`` and block-diagonal B^T ``[R, out]`` (zeroed) in place, each
    byte written once (the first request with a new set waits for this); returns the group's DoRA
    factor ``[out]`` (None: no DoRA)."""
    from edge_lora.dora import chain

    dtype = a.dtype
    dora = None
    row = col = 0
    for module, out_f, _ in members:
        folds, base = chain(pieces.get(module, []), out_f)
        if base is not None:
            if dora is None:
                dora = np.ones(b.shape[1], np.float32)
            dora[col : col + out_f] = base
        for (w, scale, _), fold in zip(pieces.get(module, ()), folds):
            a[:, row : row + w.rank] = w.a.T
            # scaled in float32 whatever the feed dtype, then cast once on the way in
            block = b[row : row + w.rank, col : col + out_f]
            if fold is None:
                np.multiply(w.b.T, np.float32(scale), out=block, dtype=np.float32, casting="unsafe")
            else:
                block[...] = (w.b.T.astype(np.float64) * (scale * fold)[None, :]).astype(dtype)
            row += w.rank
        col += out_f
    return dora
