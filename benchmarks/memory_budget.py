"""What a cold start's memory is judged against: the interpreter's baseline, the budget, the causes.

A cold-start row's peak RSS, less the interpreter and its backend's libraries (``baseline_mb``), is
held to file + adapter + KV cache (``memory_budget_parts``); ``memory_why`` spells out the peak's
steps against the budget's parts and, when over, the cause measured in docs/backend-notes.md
"Memory". ``setting`` names the engine setting a row ran in (llama.cpp's n_ctx, ONNX's sessions).
"""

from __future__ import annotations

from benchmarks import roofline


def model_config(raw: dict):
    from edge_lora.config import ModelConfig

    return ModelConfig.from_saved(raw)


def backend_of(label: str, x: dict) -> str:
    return x.get("backend") or ("llamacpp" if "llama.cpp" in label else "onnx")


def _two_sessions(label: str, x: dict) -> bool:
    """Two copies of the weights: the Python binding's plain + LoRA sessions (the C API's share one)."""
    if x.get("session_api") == "c":
        return False
    # runs before 2026-11-28 had no "plain_session" and two sessions by default ("one session" labels)
    return bool(x["plain_session"]) if "plain_session" in x else "one session" not in label


def setting(label: str, x: dict) -> str:
    if backend_of(label, x) == "llamacpp":
        grown = f", KV grown to {x['kv_positions']}" if x.get("kv_positions") else ""
        return f"llama.cpp, n_ctx {x.get('n_ctx', '?')}{grown}"
    if x.get("session_api") == "c":
        return "ONNX, C API (plain + LoRA graphs, one copy of the weights)"
    if x.get("session_api") == "python":
        return "ONNX, Python binding (plain graph until the first adapter)"
    return "ONNX, two sessions (plain_session=True)" if _two_sessions(label, x) else "ONNX, one session"


def baseline_mb(results: dict, backend: str) -> float:
    """The interpreter and one backend's libraries (before 2026-11-28: both backends' imports, one
    number)."""
    by_backend = results.get("baseline_rss_by_backend", {}).get(backend) or results.get("baseline_rss", {})
    return by_backend.get("rss_mb", 0.0)


# why a memory row is over its budget, when it is (measured in docs/backend-notes.md "Memory")
MEMORY_CAUSES = {
    "onnx": "ONNX Runtime prepacks the int4 weights into its own layout (~1.2x the file: fp32 scales "
    "and block sums added); opening the LoRA graph prepacks each weight again to find it in the shared "
    "container (the tied head's ~100 MB for a moment); an adapter is held as its arrays and as its "
    "feeds (block-diagonal B with zeros)",
    "onnx two": "each session prepacks its own copy of the weights (the C API's shared "
    "prepacked-weights container is not in the Python binding)",
    "llamacpp": "the adapter is held twice (its parsed arrays for merges, llama.cpp's own tensors); "
    "llama.cpp zeroes the KV cache it allocates (all of n_ctx unless it grows with use)",
}


def memory_why(label: str, x: dict, base_rss: float, parts: dict, met: bool) -> str:
    """The peak's steps (loaded engine, first token, adapter, its request) against the budget's parts."""
    text = f"peak {x['peak_rss_mb']:.0f} MB - {base_rss:.0f} MB interpreter+libraries"
    if "rss_after_load_mb" in x:
        marks = [
            base_rss,
            x["rss_after_load_mb"],
            x["rss_after_first_token_mb"],
            x["rss_after_adapter_mb"],
            x["peak_rss_mb"],
        ]
        names = ("loaded", "first token", "adapter added", "its request")
        steps = [(n, after - before) for n, before, after in zip(names, marks, marks[1:])]
        text += ": " + ", ".join(f"{k} {v:+.0f}" for k, v in steps)
        if x.get("peak_after_load_mb", 0) > x["rss_after_load_mb"] + 1:
            text += f" (load peak {x['peak_after_load_mb'] - base_rss:.0f})"
        if (
            x.get("peak_after_adapter_mb", 0)
            > max(x["rss_after_adapter_mb"], x.get("peak_after_load_mb", 0)) + 1
        ):
            text += f" (peak while adding {x['peak_after_adapter_mb'] - base_rss:.0f})"
    text += "; budget " + " + ".join(f"{k} {v:.0f}" for k, v in parts.items()) + " MB"
    if not met:
        backend = backend_of(label, x)
        key = "onnx two" if backend == "onnx" and _two_sessions(label, x) else backend
        text += f"; why: {MEMORY_CAUSES.get(key, '')}"
    return text


def memory_budget_parts(info: dict, label: str, plan: dict, x: dict | None = None) -> dict:
    """file + adapter + KV (MB) for a cold-start row, plus what its prefix store holds after the
    requests; ``x`` (the row) names its quant and n_ctx (older runs: the label)."""
    x = x or {}
    config = model_config(info["config"])
    quant = x.get("quant") or label.replace(" one session", "").replace(" two sessions", "").split()[-1]
    files = info["files"]
    if x.get("backend") == "llamacpp" or "llama.cpp" in label:
        # f16 KV for the positions used (issue 24); runs before the cache grew with use (no
        # "kv_positions") were judged against all of n_ctx, as it was allocated whole
        used = plan["prompt"] + plan["new_tokens"]
        positions = (
            used if x.get("kv_positions") else x.get("n_ctx") or min(config.max_position_embeddings, 4096)
        )
        kv = roofline.kv_bytes(config, positions, 2)
        adapter = files["adapter"]["gguf_mb"]
    else:  # the ONNX engine's fp32 KV buffers grow in steps of 256 positions
        kv = roofline.kv_bytes(config, -(-(plan["prompt"] + plan["new_tokens"]) // 256) * 256, 4)
        adapter = files["adapter"]["safetensors_mb"]
    parts = {"file": files[quant]["file_mb"], "adapter": adapter, "KV": kv / 1e6}
    if x.get("prefix_store_mb"):  # KV kept across requests by the prefix store, within its bound
        parts["prefix store"] = x["prefix_store_mb"]
    return parts
