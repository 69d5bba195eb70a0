"""ONNX Runtime backend benchmark: decode tok/s, prefill, adapter swap, adding an adapter, cold start.

The same random-weight models as the llama.cpp benchmark (SmolLM2-135M and Qwen2.5-0.5B shapes,
from benchmarks.gguf_bench), exported with the fast variant (MatMulNBits accuracy_level 4,
GroupQueryAttention). Cases per quant (int4, int8): base, one rank-16 all-linear adapter unmerged,
two stacked, one merged. Decoding goes through OnnxEngine's own decode state with greedy numpy
sampling, as the llama.cpp benchmark does; onnxruntime-genai decoding our very folder is the anchor.

    python -m benchmarks.onnx_bench --quick     # SmolLM2 shape, int4, short runs
    python -m benchmarks.onnx_bench             # both shapes, int4 and int8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.gguf_bench import SHAPES, make_random_model, random_adapter
from benchmarks.probes import swap_steps
from edge_lora.bundle import sha256_file, write_manifest
from edge_lora.model_dir import ModelDir


def make_bundle(model_dir: Path, out: Path, quants: list[str]) -> Path:
    from converters.onnx_export import export_onnx, export_onnx_adapter

    md = ModelDir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_bytes((md.path / "tokenizer.json").read_bytes())
    entries, adapters = [], {}
    for q in quants:
        model = export_onnx(md, out / "onnx" / f"{q}-fast", q, "fast")
        entries.append({"quant": q, "variant": "fast", "model": model.relative_to(out).as_posix()})
    (out / "adapters").mkdir(exist_ok=True)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        adapter = random_adapter(md, seed)
        adapter.save(out / f"adapters/{name}.safetensors")
        export_onnx_adapter(adapter, md.config, out / f"adapters/{name}.onnx_adapter")
        adapters[name] = {"source": f"adapters/{name}.safetensors", "onnx": f"adapters/{name}.onnx_adapter"}
    files = {
        p.relative_to(out).as_posix(): {"sha256": sha256_file(p)}
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
    write_manifest(
        out,
        {
            "model": md.config.to_dict(),
            "base_fingerprint": md.fingerprint,
            "tokenizer": {"tokenizer": "tokenizer.json"},
            "backends": {"onnx": entries},
            "adapters": adapters,
            "files": files,
        },
    )
    return out


def _one_request(engine, prompt, new_tokens, adapters) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy request through the engine's decode state."""
    from runtime.sampling import Sampler, SamplingParams

    chosen, loaded = engine._request_set(adapters)
    state = engine._new_state(chosen, loaded)
    sampler = Sampler(SamplingParams(max_new_tokens=new_tokens))
    history = list(prompt)
    t0 = time.perf_counter()
    logits = state.feed(prompt)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        token = sampler(logits, history)
        history.append(token)
        logits = state.feed([token])
    rate = new_tokens / (time.perf_counter() - t1)
    state.close()
    return prefill, rate


def _decode_rate(engine, prompt, new_tokens, adapters, repeats: int = 3) -> tuple[float, float]:
    """Best of a few requests: the CPU is shared, best-of is the least noisy."""
    runs = [_one_request(engine, prompt, new_tokens, adapters) for _ in range(repeats)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def _genai_rate(folder: Path, prompt, new_tokens: int) -> float | None:
    """onnxruntime-genai decoding our exported folder (no adapter): the ONNX-side anchor."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    from benchmarks.peers import genai_timed

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    best = 0.0
    for _ in range(3):
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=len(prompt) + new_tokens + 1, min_length=len(prompt) + new_tokens + 1, do_sample=False
        )
        best = max(best, genai_timed(og.Generator(model, params), prompt, new_tokens)[1])
    return best


CASES = (
    ("base", {}, False),
    ("1 adapter r16", {"a": 1.0}, False),
    ("2 stacked r16", {"a": 1.0, "b": 1.0}, False),
    ("merged r16", {}, True),
)


def bench_bundle(
    bundle: Path, quant: str, threads: int, prompt_len: int, new_tokens: int, swaps: int, rounds: int
) -> dict:
    """Cases interleaved in rounds (the shared CPU's load drifts): medians, best, and paired ratios
    (each round's case / the same round's base)."""
    import runtime
    from runtime.sampling import SamplingParams

    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 250, prompt_len)]
    one = SamplingParams(max_new_tokens=1)
    engine, cold, cold_checked = _cold_loads(bundle, quant, threads, prompt[:8], one)
    add_ms, attach_ms = _add_adapter_ms(engine)
    engine.generate_ids(prompt[:8], one, adapters={"a": 1.0})  # the LoRA session is open and warm
    merged = runtime.load(bundle, backend="onnx", quant=quant, threads=threads, verify_hashes=False)
    merged.add_adapter("a")
    t0 = time.perf_counter()
    merged.merge("a")
    merge_s = time.perf_counter() - t0
    swap = swap_steps(engine, "onnx", swaps)
    runs = {case: [] for case, _, _ in CASES}
    for _ in range(rounds):
        for case, adapters, on_merged in CASES:
            runs[case].append(_one_request(merged if on_merged else engine, prompt, new_tokens, adapters))
    rows = _case_rows(runs)
    rows[1].update(swap)
    rows[3]["merge_s"] = merge_s
    folder = engine.model_path.parent
    return {
        "rows": rows,
        "cold_load_first_token_s": cold,
        "cold_load_first_token_verified_s": cold_checked,
        "add_adapter_ms": max(add_ms),
        "attach_ms": max(attach_ms),
        "genai_decode_tok_s": _genai_rate(folder, prompt, new_tokens),
        "file_mb": sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6,
    }


def _cold_loads(bundle: Path, quant: str, threads: int, prompt: list[int], one) -> tuple:
    """Load to the first token, without and with the hash check; returns the first engine and both times."""
    import runtime

    t0 = time.perf_counter()
    engine = runtime.load(bundle, backend="onnx", quant=quant, threads=threads, verify_hashes=False)
    engine.generate_ids(prompt, one, adapters={})
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    checked = runtime.load(bundle, backend="onnx", quant=quant, threads=threads, verify_hashes=True)
    checked.generate_ids(prompt, one, adapters={})
    cold_checked = time.perf_counter() - t0
    del checked
    return engine, cold, cold_checked


def _add_adapter_ms(engine) -> tuple[list[float], list[float]]:
    """Adapters "a" and "b": add_adapter's ms, and the backend's part of it alone."""
    add_ms, attach_ms = [], []
    for name in ("a", "b"):
        t0 = time.perf_counter()
        engine.add_adapter(name)  # reads the .safetensors once, hash checked, and builds its feeds from it
        add_ms.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        engine._attach(
            name, engine._adapters[name].adapter, engine._adapters[name].path
        )  # the backend's part alone (handle dropped)
        attach_ms.append((time.perf_counter() - t0) * 1e3)
    return add_ms, attach_ms


def _case_rows(runs: dict) -> list[dict]:
    """Per case: median and best decode rate, the median of the paired ratios to base, median prefill."""
    rows = []
    for case, _, _ in CASES:
        rates = [r[1] for r in runs[case]]
        ratios = [r[1] / b[1] for r, b in zip(runs[case], runs["base"])]
        rows.append(
            {
                "case": case,
                "decode_tok_s": float(np.median(rates)),
                "best_tok_s": max(rates),
                "vs_base": float(np.median(ratios)),
                "prefill_ms": float(np.median([r[0] for r in runs[case]])) * 1e3,
            }
        )
    return rows


def run(quick: bool) -> dict:
    shapes = ["smollm2-135m"] if quick else list(SHAPES)
    quants = ["int4"] if quick else ["int4", "int8"]
    threads = min(2, os.cpu_count() or 1)
    prompt_len, new_tokens, swaps, rounds = (64, 32, 40, 3) if quick else (128, 64, 200, 5)
    results = {
        "threads": threads,
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        for name in shapes:
            model_dir = make_random_model(SHAPES[name], Path(tmp) / name)
            t0 = time.perf_counter()
            bundle = make_bundle(model_dir, Path(tmp) / f"{name}-bundle", quants)
            export_s = time.perf_counter() - t0
            per_quant = {
                q: bench_bundle(bundle, q, threads, prompt_len, new_tokens, swaps, rounds) for q in quants
            }
            results["models"][name] = {
                "export_s": export_s,
                "quants": per_quant,
                "adapter_mb": (bundle / "adapters/a.onnx_adapter").stat().st_size / 1e6,
            }
    return results


def table(results: dict) -> str:
    lines = [
        "| model | quant | case | decode tok/s median (best) | vs base (paired) | prefill ms "
        "| swap p50/p99 ms | first step after swap / steady ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, info in results["models"].items():
        for q, qi in info["quants"].items():
            for r in qi["rows"]:
                swap = f"{r['swap_p50_ms']:.3f} / {r['swap_p99_ms']:.3f}" if "swap_p50_ms" in r else ""
                step = (
                    f"{r['first_step_after_swap_ms']:.1f} / {r['steady_step_ms']:.1f}"
                    if "steady_step_ms" in r
                    else ""
                )
                case = r["case"] + (f" (merge {r['merge_s']:.1f} s)" if "merge_s" in r else "")
                lines.append(
                    f"| {model} | {q} ({qi['file_mb']:.0f} MB) | {case} "
                    f"| {r['decode_tok_s']:.1f} ({r['best_tok_s']:.1f}) | "
                    f"{r['vs_base']:.2f} | {r['prefill_ms']:.0f} | {swap} | {step} |"
                )
    lines.append("")
    lines.append(
        "| model | quant | cold load → 1st token s (hashes checked) | add adapter ms (backend part) "
        "| onnxruntime-genai on our folder tok/s | adapter MB | export s |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for model, info in results["models"].items():
        for q, qi in info["quants"].items():
            genai = f"{qi['genai_decode_tok_s']:.1f}" if qi["genai_decode_tok_s"] else "n/a"
            lines.append(
                f"| {model} | {q} | {qi['cold_load_first_token_s']:.2f} "
                f"({qi['cold_load_first_token_verified_s']:.2f}) | "
                f"{qi['add_adapter_ms']:.1f} ({qi['attach_ms']:.1f}) | {genai} | {info['adapter_mb']:.1f} "
                f"| {info['export_s']:.0f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, one quant, short runs")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    results = run(args.quick)
    print(
        f"threads={results['threads']} prompt={results['prompt_tokens']} new={results['new_tokens']} "
        f"rounds={results['rounds']}"
    )
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
