"""The benchmark runner: every benchmark of the project in one process tree, one report.

    python -m benchmarks              # full run (~20 min on 2 cores): both shapes, 4- and 8-bit,
                                      # training, scaling
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
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks import pool
from benchmarks.model_bench import bench_model, say
from benchmarks.plan import Plan
from benchmarks.probes import load_average

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--no-quality", action="store_true", help="skip the real-model quality rows")
    parser.add_argument("--no-native", action="store_true", help="skip the C library's rows (native/)")
    parser.add_argument(
        "--no-workload", action="store_true", help="skip the multi-adapter workload (adapters taking turns)"
    )
    parser.add_argument(
        "--only",
        choices=["quality"],
        help="run only these rows (quality: the real-model quality rows; no README update)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "gpu"],
        default="auto",
        help="GPU rows: auto (default) when a GPU device is present, cpu = none, "
        "gpu = required (fails without one)",
    )
    parser.add_argument(
        "--render", type=Path, help="only redraw the charts and summary from this results JSON"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from benchmarks import report

    if args.render:
        results = json.loads(args.render.read_text())
        results["summary"] = report.summarize(results)
        readme = args.out.resolve() == DEFAULT_OUT.resolve() and not results.get("only")
        write(results, args.out, update_readme=readme)
        return 0

    plan = Plan.make(args.quick, args.shapes.split(",") if args.shapes else None)
    plan.train &= not args.no_train
    plan.scaling &= not args.no_scaling
    plan.gpu &= args.device != "cpu"
    plan.quality &= not args.no_quality
    plan.native &= not args.no_native
    plan.workload &= not args.no_workload
    results = run_quality_only(plan) if args.only == "quality" else run_all(plan, Path(args.out))
    results["summary"] = report.summarize(results)
    (Path(args.out) / "partial.json").unlink(missing_ok=True)
    readme = args.out.resolve() == DEFAULT_OUT.resolve() and not args.only
    write(results, args.out, update_readme=readme)
    say(report.summary_markdown(results))
    say(f"done in {results['wall_s'] / 60:.1f} min -> {args.out}")
    if args.device == "gpu" and (missing := _gpu_rows_missing(results)):
        say("error: --device gpu, but the GPU rows did not run: " + ("; ".join(missing) or "no GPU result"))
        return 2
    if "error" in results.get("quality", {}) and os.environ.get("EDGE_LORA_REQUIRE_REAL_MODEL") == "1":
        say(f"error: the quality rows did not run: {results['quality']['error']}")  # CI: no real model
        return 2
    return 0


def run_all(plan: Plan, out: Path) -> dict:
    """Every benchmark of the plan: each shape's engines (out/partial.json kept after each, so a killed
    run keeps what it measured), the memory bandwidth, the interpreter's baseline memory, training."""
    started = time.time()
    load = load_average()
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
        # a killed run keeps what it measured
        (out / "partial.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "partial.json").write_text(json.dumps(results, indent=1))
    if plan.native and native_shape(plan):
        results["native"] = run_native(plan)
        (out / "partial.json").write_text(json.dumps(results, indent=1))
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
        from benchmarks import qat_bench  # the real model on a real task; a skip line under --quick

        say("== adapters trained against the device's base (real model, real task)")
        results["qat"] = qat_bench.run(plan.quick)
    if plan.quality:
        results["quality"] = run_quality(plan)
    results["load_average_end"] = load_average()
    results["wall_s"] = time.time() - started
    return results


def run_quality(plan: Plan) -> dict:
    """The real-model quality rows (benchmarks.quality_bench); a failure is kept as {"error": ...} so
    the rest of the run is written (the runner then exits 2 where EDGE_LORA_REQUIRE_REAL_MODEL=1, as in
    CI)."""
    from benchmarks import quality_bench

    say("== quality (real model)")
    try:
        return quality_bench.run(quality_bench.QualityPlan.make(plan.quick, plan.threads), say=say)
    except Exception as err:  # noqa: BLE001  reported with the run, and in the exit status
        say(f"[quality] {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {str(err)[-600:]}"}


def native_shape(plan: Plan) -> bool:
    """The C library's rows run on the SmolLM2 shape's bundle, beside its decode rows (when it is run)."""
    from benchmarks.native_bench import SHAPE

    return SHAPE in plan.shapes


def run_native(plan: Plan) -> dict:
    """The C library against the Python runtime and llama.cpp (benchmarks.native_bench): where the
    library cannot be built, {"skipped": line}; any other failure is kept as {"error": ...}."""
    from benchmarks import native_bench

    say("== C library (native/)")
    try:
        return native_bench.run(plan, say=say)
    except Exception as err:  # noqa: BLE001  reported with the run, the other sections still written
        say(f"[native] {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {str(err)[-600:]}"}


def run_quality_only(plan: Plan) -> dict:
    """``--only quality``: the quality rows alone, with the run's date, machine and load."""
    started, load = time.time(), load_average()
    results = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": plan.quick,
        "only": "quality",
        "machine": machine(),
        "plan": {k: v for k, v in plan.__dict__.items()},
        "load_average_start": load,
        "models": {},
        "quality": run_quality(plan),
    }
    results["load_average_end"] = load_average()
    results["wall_s"] = time.time() - started
    return results


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
        # every case, the dtype cases and the 0.5B shape included, 2 timed steps each (its own CLI: 5)
        return train_bench.run(False, steps=2)
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
    suffix = ("-quick" if results["quick"] else "") + (f"-{results['only']}" if results.get("only") else "")
    atomic_write_text(out / f"{stamp}{suffix}.json", json.dumps(results, indent=1) + "\n")
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
    from runtime.llamacpp.lib import cpu_has_amx

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


if __name__ == "__main__":
    sys.exit(main())
