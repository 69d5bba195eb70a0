"""Merged adapters on the llama.cpp engine: each merge precision (the base's own type, q8_0) as its own
engine, its decode paired with the base's round by round, and its logits against the unmerged
adapter's (``merge_quality``, also reported by the full run's merged workers).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def merge_quality(merged: np.ndarray, unmerged: np.ndarray, base: np.ndarray) -> dict:
    """Merged against unmerged logits: the largest difference, and the distance as a share of the
    adapter's own effect (unmerged - base; 0 = the merge kept the adapter exactly, ~1 = lost it)."""
    diff = merged - unmerged
    return {
        "max_abs_logit_diff": float(np.abs(diff).max()),
        "rel_to_adapter_effect": float(np.linalg.norm(diff) / max(np.linalg.norm(unmerged - base), 1e-30)),
        "argmax_agree": float(np.mean(merged.argmax(-1) == unmerged.argmax(-1))),
    }


def merged_rows(
    engine, bundle: Path, quant: str, threads: int, prompt, new_tokens: int, one_request, rounds: int = 5
):
    """Adapter "a" merged at each precision ("base": the base's own type; "q8_0"), each its own engine:
    merge time, logits against the unmerged engine's, decode paired with the base round by round.
    ``one_request(engine, prompt, new_tokens, adapters)`` -> (prefill s, tokens/s): the llama.cpp
    benchmark's timed request (benchmarks.gguf_bench, which calls this), so both time alike."""
    import runtime

    base_logits = engine.logits(prompt, adapters={})
    unmerged = engine.logits(prompt, adapters={"a": 1.0})
    merged = {}
    for precision in ("base", "q8_0"):
        m = runtime.load(
            bundle, backend="llamacpp", quant=quant, threads=threads, n_ctx=1024, merge_precision=precision
        )
        m.add_adapter("a")
        t0 = time.perf_counter()
        m.merge("a")
        merged[precision] = (
            m,
            time.perf_counter() - t0,
            merge_quality(m.logits(prompt), unmerged, base_logits),
        )
    rates = {k: [] for k in ["base model", *merged]}
    for _ in range(rounds):  # interleaved: the ratios are paired per round
        rates["base model"].append(one_request(engine, prompt, new_tokens, {})[1])
        for precision, (m, _, _) in merged.items():
            rates[precision].append(one_request(m, prompt, new_tokens, {})[1])
    rows = []
    for precision, (m, merge_s, quality) in merged.items():
        ratio = float(np.median(np.array(rates[precision]) / np.array(rates["base model"])))
        rows.append(
            {
                "case": f"merged r16 ({precision if precision != 'base' else quant})",
                "decode_tok_s": float(np.median(rates[precision])),
                "vs_base_paired": ratio,
                "prefill_ms": float("nan"),
                "merge_s": merge_s,
                **quality,
            }
        )
        m.close()
    return rows
