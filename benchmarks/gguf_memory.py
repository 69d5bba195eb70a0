"""The llama.cpp engine's memory levers (issue 24): peak RSS of a fresh process per engine setting.

Each lever is a cold-start worker (``benchmarks.worker``: load, first token, add adapter "a", a
64 + 32 token request) with its engine options, in interleaved rounds, against file + adapter + f16
KV for the positions used, the cold-start budget of ``benchmarks.memory_budget``.

    python -m benchmarks.gguf_bench --memory 3
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MEMORY_LEVERS = {
    "KV whole n_ctx 2048 (before)": {"n_ctx": 2048, "n_ctx_start": None},
    "KV grows from 256 (default)": {"n_ctx": 2048},
    "KV grows, n_batch 64": {"n_ctx": 2048, "n_batch": 64},
    "KV whole 2048, n_batch 64": {"n_ctx": 2048, "n_ctx_start": None, "n_batch": 64},
    "KV grows, mmap off": {"n_ctx": 2048, "mmap": False},
    "KV grows, mmap on": {"n_ctx": 2048, "mmap": True},
}
STEPS = ("rss_after_load_mb", "rss_after_first_token_mb", "rss_after_adapter_mb", "peak_rss_mb")


def memory_levers(bundle: Path, quant: str, rounds: int, prompt: int = 64, new_tokens: int = 32) -> dict:
    """Per lever, the median MB above the interpreter and llama.cpp's libraries at each step, and the
    peak over the budget."""
    from benchmarks import pool, roofline
    from edge_lora.config import ModelConfig

    manifest = json.loads((bundle / "bundle.json").read_text())
    config = ModelConfig.from_saved(manifest["model"])
    budget = {
        "file": (bundle / f"gguf/model-{quant}.gguf").stat().st_size / 1e6,
        "adapter": (bundle / "adapters/a.gguf").stat().st_size / 1e6,
        "KV": roofline.kv_bytes(config, prompt + new_tokens, 2) / 1e6,
    }
    spec = {"kind": "cold", "backend": "llamacpp", "quant": quant, "bundle": str(bundle), "threads": 2}
    spec.update(prompt=prompt, new_tokens=new_tokens)
    runs: dict[str, list] = {k: [] for k in MEMORY_LEVERS}
    base = []
    for _ in range(rounds):
        base.append(pool.run_once({"kind": "baseline", "backend": "llamacpp"})["rss_mb"])
        for lever, options in MEMORY_LEVERS.items():
            runs[lever].append(pool.run_once({**spec, "engine_options": options}))
    baseline = float(np.median(base))
    rows = {}
    for lever, xs in runs.items():
        ok = [x for x in xs if "error" not in x]
        if not ok:
            rows[lever] = {"error": xs[0]["error"]}
            continue
        mb = {k: float(np.median([x[k] for x in ok])) - baseline for k in STEPS}
        rows[lever] = {
            **mb,
            "ratio": mb["peak_rss_mb"] / sum(budget.values()),
            "first_add_ms": float(np.median([x["first_add_ms"] for x in ok])),
            "kv_positions": ok[0].get("kv_positions"),
        }
    return {"baseline_mb": baseline, "budget_mb": budget, "levers": rows}


def table(out: dict) -> str:
    budget = " + ".join(f"{k} {v:.1f}" for k, v in out["budget_mb"].items())
    lines = [
        f"budget {budget} MB; interpreter + llama.cpp libraries {out['baseline_mb']:.0f} MB (subtracted)",
        "| lever | loaded | + first token | + adapter | peak | peak / budget | KV positions | first add ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lever, r in out["levers"].items():
        if "error" in r:
            lines.append(f"| {lever} | error: {r['error'][:120]} |")
            continue
        cells = " | ".join(f"{r[k]:.0f}" for k in STEPS)
        lines.append(
            f"| {lever} | {cells} | {r['ratio']:.2f} | {r['kv_positions']} | {r['first_add_ms']:.1f} |"
        )
    return "\n".join(lines)
