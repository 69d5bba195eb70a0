"""The benchmark runner: every benchmark of the project in one process tree, one report.

    python -m benchmarks              # full run (~20 min on 2 cores): both shapes, 4- and 8-bit, training, scaling
    python -m benchmarks --quick      # CI form (< 5 min): SmolLM2 shape, 4-bit, short requests
    edge-lora bench [--quick] [--out DIR] [--device auto|cpu|gpu]   GPU rows when a GPU device is present

Writes DIR/<date>.json, DIR/*.png and DIR/summary.md; with the default DIR (benchmarks/results)
it also regenerates the Summary section of benchmarks/README.md. Engines run in their own
processes (benchmarks.worker), interleaved in rounds: medians and paired ratios are reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

from benchmarks import pool
from benchmarks.plan import Plan

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_model(plan: Plan, shape: str) -> dict:
    from benchmarks import models, peers
    from benchmarks.plan import workers as plan_workers

    t0 = time.perf_counter()
    model = models.prepare(shape, plan.quants, say)
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
    extra = models.extra_adapter(model, "extra", 16, 99)
    prep_s = time.perf_counter() - t0
    say(f"[{shape}] prepared in {prep_s:.0f} s; starting engines")
    built = {k: v for k, v in genai.items() if not k.endswith("_error")}
    planned = plan_workers(plan, model, built, merged, str(extra), lora_files)
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
            }
            for w in workers
        }
        scaling = run_scaling(plan, model, workers) if plan.scaling and shape == plan.shapes[0] else {}
    finally:
        for w in workers:
            w.stop()
    cold = {}
    # ONNX twice: the default (on the CPU one LoRA session for every request) and plain_session=True (a
    # second session, model.plain.onnx, for requests without adapters: a second copy of the weights)
    runs = [("onnx", q, plain) for q in plan.onnx_quants[:1] for plain in (None, True)]
    for backend, quant, plain in runs + [("llamacpp", q, None) for q in plan.gguf_quants[:1]]:
        engine = "llama.cpp" if backend == "llamacpp" else backend
        label = f"edge-lora {engine} {quant}{' two sessions' if plain else ''}"
        say(f"  cold start: {label}")
        spec = {
            "kind": "cold",
            "backend": backend,
            "quant": quant,
            "bundle": str(model.bundle),
            "threads": plan.threads,
            "prompt": plan.prompt,
            "new_tokens": plan.new_tokens,
        }
        cold[label] = pool.run_once({**spec, **({} if plain is None else {"plain_session": plain})})
    gpu = {}
    if plan.gpu:
        say("  GPU rows (each backend on its GPU device, if any)")
        gpu = pool.run_once(
            {
                "kind": "gpu",
                "bundle": str(model.bundle),
                "tokens": 8 if plan.quick else 32,
                "prompt": plan.prompt,
                "threads": plan.threads,
            },
            timeout=1200,
        )
    return {
        "shape": shape,
        "prepare_s": prep_s,
        "decode": decode,
        "extras": extras,
        "memory": memory,
        "cold": cold,
        "gpu": gpu,
        "scaling": scaling,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the CI form: one shape, 4-bit, short requests (< 5 min)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder for the JSON, charts and summary (default: benchmarks/results)",
    )
    parser.add_argument("--shapes", help="comma list of smollm2-135m, qwen2.5-0.5b")
    parser.add_argument("--no-train", action="store_true", help="skip the training benchmark")
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling sweeps")
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="GPU rows: auto (default) when a GPU device is present, cpu = none, gpu = required (fails without one)",
    )
    parser.add_argument(
        "--render", type=Path, help="only redraw the charts and summary from this results JSON"
    )
    args = parser.parse_args(argv)
    from benchmarks import report

    if args.render:
        results = json.loads(args.render.read_text())
        results["summary"] = report.summarize(results)
        write(results, args.out, update_readme=args.out.resolve() == DEFAULT_OUT.resolve())
        return 0

    plan = Plan.make(args.quick, args.shapes.split(",") if args.shapes else None)
    plan.train &= not args.no_train
    plan.scaling &= not args.no_scaling
    plan.gpu &= args.device != "cpu"
    started = time.time()
    load = _loadavg()
    results = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": plan.quick,
        "machine": machine(),
        "plan": {k: v for k, v in plan.__dict__.items()},
        "load_average_start": load,
        "models": {},
    }
    for shape in plan.shapes:
        say(f"== {shape}")
        results["models"][shape] = bench_model(plan.for_shape(shape), shape)
        (Path(args.out) / "partial.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "partial.json").write_text(
            json.dumps(results, indent=1)
        )  # a killed run keeps what it measured
    say("== memory bandwidth")
    working = sorted(
        {
            max(16, int(m["files"][q]["token_weight_mb"]))
            for m in results["models"].values()
            for q in plan.gguf_quants
            if q in m["files"]
        }
    )
    results["bandwidth"] = pool.run_once(
        {"kind": "bandwidth", "threads": plan.threads, "quick": plan.quick, "working_set_mb": working}
    )
    results["baseline_rss"] = pool.run_once({"kind": "baseline"})
    results["baseline_rss_by_backend"] = {
        b: pool.run_once({"kind": "baseline", "backend": b}) for b in ("onnx", "llamacpp")
    }
    if plan.train:
        say("== training")
        results["train"] = run_train(plan.quick)
    results["load_average_end"] = _loadavg()
    results["wall_s"] = time.time() - started
    results["summary"] = report.summarize(results)
    (Path(args.out) / "partial.json").unlink(missing_ok=True)
    write(results, args.out, update_readme=args.out.resolve() == DEFAULT_OUT.resolve())
    say(report.summary_markdown(results))
    say(f"done in {results['wall_s'] / 60:.1f} min -> {args.out}")
    if args.device == "gpu" and (missing := _gpu_rows_missing(results)):
        say("error: --device gpu, but the GPU rows did not run: " + ("; ".join(missing) or "no GPU result"))
        return 2
    return 0


def _gpu_rows_missing(results: dict) -> list[str]:
    """Why the GPU rows are missing, per shape and backend (nothing when they all ran)."""
    gpus = {shape: m["gpu"] for shape, m in results["models"].items() if m.get("gpu")}
    if not gpus:
        return ["no GPU result"]
    missing = [f"{shape}: {gpu['error']}" for shape, gpu in gpus.items() if "error" in gpu]
    return missing + [
        f"{shape} {backend}: {row['skipped']}"
        for shape, gpu in gpus.items()
        for backend, row in gpu.get("backends", {}).items()
        if "skipped" in row
    ]


def run_train(quick: bool) -> dict:
    from benchmarks import train_bench

    if not quick:
        return train_bench.run(True)  # all five cases, 2 timed steps each (its own full form takes 5)
    # CI: the two anchor cases, one timed step each (the full run has all five)
    model_dir = train_bench.make_model(
        Path(train_bench.tempfile.gettempdir()) / "edge_lora_bench" / "smollm2-135m-fp32"
    )
    cases = {
        name: train_bench._spawn(model_dir, 1, worker, quant, ckpt, compute)
        for name, worker, quant, ckpt, compute in train_bench.CASES[:2]
    }
    return {
        "benchmark": "train",
        "quick": True,
        "cases": cases,
        "rank": train_bench.RANK,
        "batch": train_bench.BATCH,
        "seq": train_bench.SEQ,
    }


def write(results: dict, out: Path, update_readme: bool) -> None:
    from benchmarks import charts, report
    from edge_lora.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    stamp = results["date"][:10]
    atomic_write_text(
        out / f"{stamp}{'-quick' if results['quick'] else ''}.json", json.dumps(results, indent=1) + "\n"
    )
    pngs = charts.draw_all(results, out)
    atomic_write_text(out / "summary.md", report.summary_markdown(results, pngs, out) + "\n")
    if update_readme:
        report.update_readme(HERE / "README.md", results, pngs)


def machine() -> dict:
    import os

    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    from runtime.llamacpp_lib import cpu_has_amx

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "amx": cpu_has_amx(),
        "python": platform.python_version(),
        "versions": _versions(),
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "onnxruntime",
        "onnxruntime-genai",
        "llama_cpp_python",
        "torch",
        "transformers",
        "peft",
        "numpy",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
