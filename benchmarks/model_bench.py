"""One model shape's benchmark, as the runner (python -m benchmarks) drives it.

``bench_model`` prepares the model and its peers' files (ORT GenAI's builds, llama.cpp's merged GGUF
and adapter GGUFs by dtype), runs every engine in interleaved rounds (decode, then the swap / add
extras, memory and, on the first shape, the scaling sweeps), the multi-adapter workload, then the cold
starts from fresh processes and the GPU rows; it returns the shape's raw results with its files' sizes
and config.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks import pool
from benchmarks.plan import Plan


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model(plan: Plan, shape: str) -> dict:
    from benchmarks import models
    from benchmarks.plan import workers as plan_workers

    t0 = time.perf_counter()
    model = models.prepare(shape, plan.quants, say)
    genai, merged, lora_files = _prepare_peers(plan, model)
    extra = models.extra_adapter(model, "extra", 16, 99)
    prep_s = time.perf_counter() - t0
    say(f"[{shape}] prepared in {prep_s:.0f} s; starting engines")
    built = {k: v for k, v in genai.items() if not k.endswith("_error")}
    planned = plan_workers(plan, model, built, merged, str(extra), lora_files)
    decode, extras, memory, scaling = _run_engines(plan, model, shape, planned)
    workload = _workload(plan, model) if plan.workload else {}
    cold = _cold_starts(plan, model)
    gpu = _gpu_rows(plan, model) if plan.gpu else {}
    return {
        "shape": shape,
        "prepare_s": prep_s,
        "decode": decode,
        "extras": extras,
        "memory": memory,
        "cold": cold,
        "gpu": gpu,
        "scaling": scaling,
        "workload": workload,
        "files": file_sizes(model, plan),
        "config": config_dict(model),
        "lora_files": {
            k: {"mb": Path(v).stat().st_size / 1e6}
            for k, v in {"edge-lora f32": model.gguf_adapter("a"), **lora_files}.items()
        },
        "workers": {
            w.label: {"cases": w.cases, "kind": w.spec["kind"], "error": w.info.get("error")} for w in planned
        },
        "genai_build_errors": {k: v for k, v in genai.items() if k.endswith("_error")},
    }


def _prepare_peers(plan: Plan, model) -> tuple[dict, dict, dict]:
    """The peers' files: ORT GenAI's builds (plain, adapter baked; errors kept), llama.cpp's merged GGUFs
    and the adapter GGUFs by dtype (llama.cpp's converter's, and ours on a full run)."""
    from benchmarks import peers

    genai = {}
    for key, with_adapter in (("plain", False), ("baked", True)):
        try:
            genai[key] = peers.build_genai(model, with_adapter, say)
        except Exception as err:  # noqa: BLE001  a peer that cannot be built here is reported, not fatal
            say(f"[peers] {err}")
            genai[f"{key}_error"] = str(err)[-400:]
    merged = {q: peers.merged_gguf(model, q) for q in plan.gguf_quants if plan.merged and q.startswith("q4")}
    # adapter "a" as llama.cpp's own converter writes it (the peer at its best) and as ours does, per dtype
    lora_files = {}
    try:
        lora_files.update({f"convert {t}": str(p) for t, p in peers.peer_lora_ggufs(model, say).items()})
    except Exception as err:  # noqa: BLE001  reported, not fatal
        say(f"[peers] {err}")
    if not plan.quick:
        ours = peers.our_lora_ggufs(model)
        lora_files.update({f"edge-lora {t}": str(p) for t, p in ours.items() if t != "f32"})
    return genai, merged, lora_files


def _run_engines(plan: Plan, model, shape: str, planned: list) -> tuple[dict, dict, dict, dict]:
    """Start every planned worker, decode in interleaved rounds, then ask ours for the swap / add extras,
    every worker for its memory, and (first shape) run the scaling sweeps; the workers stop after."""
    workers = pool.start_all(planned, say)
    try:
        decode = pool.rounds(workers, plan.rounds, say)
        extras = {}
        for w in workers:
            if w.spec["kind"].startswith("ours-") and not w.spec.get("merged") or w.spec.get("adapter"):
                say(f"  extras: {w.label}")
                extras[w.label] = w.ask("extras", swaps=plan.swaps)
        memory = {
            w.label: {
                **w.ask("rss"),
                "after_load_rss_mb": w.info.get("rss_mb"),
                "load_s": w.info.get("load_s"),
                **({"merge_quality": w.info["merge_quality"]} if "merge_quality" in w.info else {}),
            }
            for w in workers
        }
        scaling = run_scaling(plan, model, workers) if plan.scaling and shape == plan.shapes[0] else {}
    finally:
        for w in workers:
            w.stop()
    return decode, extras, memory, scaling


def _workload(plan: Plan, model) -> dict:
    """The multi-adapter workload (benchmarks.workload_bench), after the decode rows' workers stopped; a
    failure is kept as {"error": ...} so the rest of the run goes on."""
    from benchmarks import workload_bench

    say("  workload: one system prompt, three adapters taking turns")
    try:
        return workload_bench.run_for_model(plan, model, say=say)
    except Exception as err:  # noqa: BLE001  reported with the run, the other sections still written
        say(f"[workload] {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {str(err)[-600:]}"}


def _cold_starts(plan: Plan, model) -> dict:
    """Each of our backends from a fresh process: load, first token, adapter add, memory at each step."""
    cold = {}
    # ONNX twice: the default (on the CPU the C API: plain and LoRA graphs over one copy of the weights)
    # and the Python binding's sessions (session_api="python"), to compare
    runs = [("onnx", q, api) for q in plan.onnx_quants[:1] for api in (None, "python")]
    for backend, quant, api in runs + [("llamacpp", q, None) for q in plan.gguf_quants[:1]]:
        engine = "llama.cpp" if backend == "llamacpp" else backend
        label = f"edge-lora {engine} {quant}{' python binding' if api else ''}"
        say(f"  cold start: {label}")
        spec = {
            "kind": "cold",
            "backend": backend,
            "quant": quant,
            "bundle": str(model.bundle),
            "threads": plan.threads,
            "prompt": plan.prompt,
            "new_tokens": plan.new_tokens,
            **({"engine_options": {"session_api": api}} if api else {}),
        }
        cold[label] = pool.run_once(spec)
    return cold


def _gpu_rows(plan: Plan, model) -> dict:
    say("  GPU rows (each backend on its GPU device, if any)")
    return pool.run_once(
        {
            "kind": "gpu",
            "bundle": str(model.bundle),
            "tokens": 8 if plan.quick else 32,
            "prompt": plan.prompt,
            "threads": plan.threads,
        },
        timeout=1200,
    )


def run_scaling(plan: Plan, model, workers) -> dict:
    """The sweeps on edge-lora's 4-bit engines (their workers are still loaded)."""
    from benchmarks.models import extra_adapter

    ranks = [4, 8, 16, 32, 64] if not plan.quick else [4, 64]
    counts = [1, 2, 4, 8, 16, 32] if not plan.quick else [1, 4]
    cmd = {
        "ranks": {str(r): str(extra_adapter(model, "rank", r, 100 + r)) for r in ranks},
        "loaded": [str(extra_adapter(model, "loaded", 16, 200 + i)) for i in range(max(counts))],
        "loaded_counts": counts,
        "stacked": [1, 2, 3, 4] if not plan.quick else [1, 2],
        "contexts": [128, 512, 1024, 2000] if not plan.quick else [128, 512],
        "prompt": plan.prompt,
        "new_tokens": 16,
        "repeats": 1,
    }
    out = {}
    for w in workers:
        if (
            w.spec["kind"].startswith("ours-")
            and not w.spec.get("merged")
            and w.label.endswith(("int4", "q4_0"))
        ):
            # every sweep on the first (ONNX Runtime) backend; llama.cpp's take too long on 2 shared cores,
            # so it runs only the adapters-loaded one (memory and decode by number of adapters loaded)
            say(f"  scaling: {w.label}")
            out[w.label] = w.ask("scaling", **cmd, **({"sweeps": ["loaded"]} if out else {}))
    return out


def file_sizes(model, plan: Plan) -> dict:
    from benchmarks import roofline

    sizes = {}
    for q in plan.gguf_quants:
        sizes[q] = {
            "file_mb": model.gguf(q).stat().st_size / 1e6,
            "token_weight_mb": roofline.gguf_weight_bytes(model.gguf(q)) / 1e6,
        }
    for q in plan.onnx_quants:
        folder = model.onnx_folder(q)
        sizes[q] = {
            "file_mb": sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6,
            "token_weight_mb": roofline.onnx_weight_bytes(folder) / 1e6,
        }
    sizes["adapter"] = {
        "safetensors_mb": model.adapter_file("a").stat().st_size / 1e6,
        "gguf_mb": model.gguf_adapter("a").stat().st_size / 1e6,
        "onnx_adapter_mb": model.onnx_adapter("a").stat().st_size / 1e6,
    }
    return sizes


def config_dict(model) -> dict:
    from edge_lora.model_dir import ModelDir

    return ModelDir(model.hf_dir).config.to_dict()
