"""GPU rows: each backend on its GPU device next to the same engine on the CPU, one bundle.

On a software device (Mesa's lavapipe on a machine without a GPU) the rows show correctness and
the cost structure, not speed: greedy agreement with the CPU, what is uploaded to the device and
when (an adapter set once, at its first request), and what a decode step moves (ONNX: ORT's own
profile of every device copy, plus the bound token and logits). On a real GPU the same rows show
speed. Without a GPU device the rows say why they are missing.

    python -m benchmarks.gpu_bench BUNDLE [--tokens 8]     (the runner calls measure() in a worker)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CASES = {"base": {}, "a": {"a": 1.0}}
QUANTS = {"onnx": "int4", "llamacpp": "q4_0"}


def measure(bundle: str, tokens: int = 8, prompt_len: int = 32, threads: int = 2) -> dict:
    import numpy as np

    from edge_lora.errors import EdgeLoraError

    ids = [int(t) for t in np.random.default_rng(0).integers(3, 250, prompt_len)]
    rows = {}
    for backend, quant in QUANTS.items():
        try:
            rows[backend] = _backend(bundle, backend, quant, ids, tokens, threads)
        except EdgeLoraError as err:
            rows[backend] = {"skipped": str(err)}
    return {"benchmark": "gpu", "tokens": tokens, "prompt": prompt_len, "backends": rows}


def _backend(bundle: str, backend: str, quant: str, ids: list[int], tokens: int, threads: int) -> dict:
    import runtime
    from runtime.sampling import SamplingParams

    profile = Path(tempfile.mkdtemp(prefix="edge-lora-gpu-profile-")) if backend == "onnx" else None
    options = {"quant": quant, **({"profile_dir": profile} if profile else {})}
    t0 = time.perf_counter()
    gpu = runtime.load(bundle, backend=backend, device="gpu", **options)
    load_s = time.perf_counter() - t0
    cpu = runtime.load(bundle, backend=backend, device="cpu", quant=quant, threads=threads)
    t0 = time.perf_counter()
    gpu.add_adapter("a")
    add_ms = 1000 * (time.perf_counter() - t0)
    cpu.add_adapter("a")
    out = {
        "device": gpu.info()["device"],
        "quant": quant,
        "load_s": round(load_s, 3),
        "add_adapter_ms": round(add_ms, 1),
        "cases": {},
    }
    params = SamplingParams(max_new_tokens=tokens)
    for case, adapters in CASES.items():
        t0 = time.perf_counter()
        gpu.generate_ids(
            ids, SamplingParams(max_new_tokens=2), adapters=adapters
        )  # the first use compiles shaders
        first_s = time.perf_counter() - t0
        uploads_before = _lora_uploads(gpu)
        t0 = time.perf_counter()
        ours = gpu.generate_ids(ids, params, adapters=adapters)
        gpu_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        theirs = cpu.generate_ids(ids, params, adapters=adapters)
        cpu_s = time.perf_counter() - t0
        same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        out["cases"][case] = {
            "first_request_s": round(first_s, 2),
            "gpu_tok_s": round(len(ours) / gpu_s, 2),
            "cpu_tok_s": round(len(theirs) / cpu_s, 2),
            "greedy_prefix_equal": f"{same}/{len(theirs)}",
            "lora_uploads_during_request": _lora_uploads(gpu) - uploads_before,
        }
    if profile:
        out["per_decode_step"] = _onnx_step_bytes(gpu, gpu.end_profiling())
    else:
        info = gpu.info()
        out["per_decode_step"] = {
            "n_gpu_layers": info["n_gpu_layers"],
            "note": "llama.cpp keeps weights, LoRA and KV on the device; "
            "a step sends the token and reads the logits back",
        }
    return out


def _lora_uploads(engine) -> int:
    return engine.info()["device"].get("uploads", {}).get("lora", {}).get("count", 0)


def _onnx_step_bytes(engine, profiles: list[Path]) -> dict:
    """Bytes one decode step moves between host and device: the copies ORT makes inside the graph
    (its profile's Memcpy nodes), the token bound from the host and the logits bound to it."""
    copies = runs = 0
    for path in profiles:
        events = json.loads(path.read_text())
        runs += sum(1 for e in events if e.get("name") == "model_run")
        copies += sum(
            int(e["args"].get("output_size", 0))
            for e in events
            if e.get("cat") == "Node"
            and e["name"].startswith("Memcpy")
            and e["name"].endswith("_kernel_time")
        )
    graph_copies = copies / max(runs, 1)
    token, logits = 8, 4 * engine.config.vocab_size
    return {
        "host_to_device_bytes": token + graph_copies,
        "device_to_host_bytes": logits,
        "graph_copy_bytes_per_run": graph_copies,
        "runs_profiled": runs,
        "kv_and_lora_bytes": 0,
        "resident_lora_mb": round(engine.info()["device"]["resident_lora_bytes"] / 1e6, 2),
    }


def markdown(result: dict) -> list[str]:
    if not result or "backends" not in result:
        return [f"GPU rows: not run ({(result or {}).get('error', 'no result')[:200]})", ""]
    lines = [
        "### GPU (each backend on its GPU device next to the same engine on the CPU)",
        "",
        "| backend | device | case | GPU tok/s | CPU tok/s | greedy equal | LoRA uploads in the request "
        "| first request s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for backend, row in result["backends"].items():
        if "skipped" in row:
            notes.append(f"{backend}: no GPU device ({row['skipped'][:160]})")
            continue
        for case, c in row["cases"].items():
            lines.append(
                f"| {backend} {row['quant']} | {row['device']['name']} | {case} | {c['gpu_tok_s']} "
                f"| {c['cpu_tok_s']} | "
                f"{c['greedy_prefix_equal']} | {c['lora_uploads_during_request']} | {c['first_request_s']} |"
            )
        step = row["per_decode_step"]
        if "host_to_device_bytes" in step:
            notes.append(
                f"{backend}: a decode step moves {step['host_to_device_bytes']:.0f} B in and "
                f"{step['device_to_host_bytes']} B (the logits) out; KV cache and LoRA stay on the device "
                f"({step['resident_lora_mb']} MB of LoRA resident)"
            )
        if row["device"].get("software"):
            notes.append(
                f"{backend}: {row['device']['name']} is a software device: the tok/s are not a GPU's speed"
            )
    return lines + [""] + [f"- {n}" for n in notes] + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("bundle")
    parser.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args(argv)
    result = measure(args.bundle, args.tokens)
    print(json.dumps(result, indent=1))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
