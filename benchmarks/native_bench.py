"""The C library (native/, libedge_lora) against the Python runtime and llama.cpp, on one bundle.

    python -m benchmarks.native_bench [--quick] [--rounds N] [--bundle DIR] [--json PATH]
    (and a section of python -m benchmarks: results["native"], the Summary's "C library (native/)")

In one run, on the benchmark's SmolLM2-135M-shaped bundle (random weights, GGUF q4_0, rank-16 adapters
"a" and "b"), with the decode rows' threads, prompt and decoded tokens, each engine in its own worker
process (benchmarks.worker), every (engine, case) once per round, the order rotated each round, and every
two rounds each engine in a fresh process (started in a rotated order: one process's speed is not the
engine's, see benchmarks.pool.rounds):

    edge-lora C library q4_0   the library through runtime/native.py: base, "a", "a"+"b" stacked
    edge-lora llama.cpp q4_0   the Python runtime (runtime.load(..., backend="llamacpp")), same cases
    llama.cpp q4_0             llama.cpp's own base decode through llama-cpp-python (the decode rows' peer)

The library's per-token time comes from its token callback: a timestamp per token, decode tok/s =
tokens after the first / (last stamp - first stamp), so every interval is one llama_decode of one token
plus the sampling of the next, as the Python runtime's loop times it (prefill ms: the call's start to
the first token). Each request prefills its whole prompt (the library's prefix cache is moved off it
first, as the Python worker forgets its cache). Then libedge_lora.so's size (and stripped), and the peak
resident memory of a fresh process that opens the bundle with the library and decodes (base, then with
"a"), beside the same for the Python runtime. Where scripts/native-build.sh cannot build the library
the section is one "skipped" line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import pool
from benchmarks.pool import median, paired_ratio

if TYPE_CHECKING:  # the memory child imports this module: it stays light (no numpy before it measures)
    from benchmarks.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "smollm2-135m"
QUANT = "q4_0"
CASES = ["base", "a", "ab"]
CASE_SETS = {"base": {}, "a": {"a": 1.0}, "ab": {"a": 1.0, "b": 1.0}}
LIB, PY, PEER = "edge-lora C library q4_0", "edge-lora llama.cpp q4_0", "llama.cpp q4_0"
GOAL_VS_PYTHON, GOAL_VS_LLAMA = 1.0, 0.98
# rounds per worker process: the goals are tighter than the 5% two processes of one engine can differ by
FRESH_EVERY = 2


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- building and sizing the library ----------------------------------------------------


def build_library() -> tuple[Path | None, str | None]:
    """scripts/native-build.sh's build folder's libedge_lora.so, or why there is none (one line)."""
    script = ROOT / "scripts" / "native-build.sh"
    try:
        done = subprocess.run(
            ["bash", str(script)],
            cwd=ROOT,
            env=dict(os.environ, PYTHON=sys.executable),
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{script}: the C library did not build: {err} (hint: run it by hand to see why)"
    if done.returncode != 0:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        return None, f"{script}: the C library did not build: {last[:300]} (hint: run it by hand to see why)"
    lib = Path(done.stdout.strip().splitlines()[-1]) / "libedge_lora.so"
    if not lib.is_file():
        return None, f"{lib}: not found after the build (hint: rebuild with scripts/native-build.sh)"
    return lib, None


def library_size(lib: Path) -> dict:
    """The library file's bytes, and stripped (``strip`` on a temporary copy) where strip exists."""
    real = lib.resolve()
    out = {"path": str(real), "bytes": real.stat().st_size, "stripped_bytes": None}
    strip = shutil.which("strip")
    if strip:
        with tempfile.TemporaryDirectory(prefix="edge-lora-strip-") as tmp:
            copy = Path(tmp) / real.name
            done = subprocess.run([strip, "-o", str(copy), str(real)], capture_output=True, text=True)
            if done.returncode == 0:
                out["stripped_bytes"] = copy.stat().st_size
    return out


# --- the library's engine in a worker process ---------------------------------------------


def decode_rate(stamps: list[float]) -> float | None:
    """Decode tok/s from per-token timestamps: the tokens after the first over the time they took."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return None
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def timed_generate(engine, adapters: dict, prompt: list[int], new_tokens: int) -> dict:
    """One greedy request through the library, ``new_tokens`` decode steps timed by its token callback."""
    # el_engine_logits leaves one other token in the prefix cache: the request prefills its whole prompt
    engine.logits([prompt[0] + 1], adapters)
    stamps: list[float] = []

    def on_token(_token: int) -> bool:
        stamps.append(time.perf_counter())
        return False

    t0 = time.perf_counter()
    engine.generate(prompt, adapters, max_new_tokens=new_tokens + 1, on_token=on_token)
    out = {"tok_s": decode_rate(stamps), "prefill_ms": (stamps[0] - t0) * 1e3 if stamps else None}
    if len(stamps) < new_tokens + 1:  # an end-of-generation token: fewer steps timed
        out["decoded"] = max(0, len(stamps) - 1)
    return out


class NativeWorker:
    """A benchmarks.worker engine (kind "native"): the library's engine on the bundle, adapters added."""

    def __init__(self, spec: dict):
        from runtime.native import NativeLibrary

        library = NativeLibrary(spec["library"])
        t0 = time.perf_counter()
        self.engine = library.open(
            spec["bundle"], quant=spec["quant"], threads=spec["threads"], n_ctx=spec.get("n_ctx", 2048)
        )
        self.load_s = time.perf_counter() - t0
        for name in spec.get("adapters", ["a", "b"]):
            self.engine.add_adapter(name)

    def decode(self, case: str, prompt: list[int], new_tokens: int) -> dict:
        return timed_generate(self.engine, CASE_SETS[case], prompt, new_tokens)


# --- peak memory of a fresh process ---------------------------------------------------------


def _vm() -> dict:
    """Resident MB now and at the peak (VmHWM), read without importing numpy (benchmarks.probes does)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {
        "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
        "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024,
    }


def _mapped_libraries() -> list[str]:
    """The shared libraries this process has mapped from llama.cpp's folder or the library's build."""
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split(maxsplit=5)[-1].strip() if line.count(" ") >= 5 else ""
            if ".so" in path and ("llama_cpp" in path or "edge_lora" in path):
                found.add(path)
    return sorted(found)


def memory_child(spec: dict) -> dict:
    """In a fresh process: open the bundle (the library, or the Python runtime), add "a", decode the base
    and then with "a"; resident MB of the bare interpreter, before the open (libraries imported), after
    it, at the end, and the peak (VmHWM)."""
    bare = _vm()
    from benchmarks.probes import prompt_ids

    prompt, n = prompt_ids(spec["prompt"]), spec["new_tokens"]
    if spec["engine"] == "native":
        from runtime.native import NativeLibrary

        library = NativeLibrary(spec["library"])
        before = _vm()
        engine = library.open(spec["bundle"], quant=QUANT, threads=spec["threads"], n_ctx=2048)
        opened = _vm()
        engine.add_adapter("a")
        for adapters in ({}, {"a": 1.0}):
            engine.generate(prompt, adapters, max_new_tokens=n)
    else:
        import llama_cpp  # noqa: F401  the libraries, as benchmarks.worker's baseline counts them

        import runtime
        from runtime.llamacpp import lib as llamacpp_lib
        from runtime.sampling import SamplingParams

        llamacpp_lib.silence_log(False)
        before = _vm()
        engine = runtime.load(
            spec["bundle"], backend="llamacpp", quant=QUANT, threads=spec["threads"], n_ctx=2048
        )
        opened = _vm()
        engine.add_adapter("a")
        for adapters in ({}, {"a": 1.0}):
            engine.generate_ids(prompt, SamplingParams(max_new_tokens=n), adapters=adapters)
    end = _vm()
    return {
        "interpreter_mb": bare["rss_mb"],
        "before_open_mb": before["rss_mb"],
        "after_open_mb": opened["rss_mb"],
        "end_mb": end["rss_mb"],
        "peak_rss_mb": end["peak_rss_mb"],
        "peak_above_interpreter_mb": end["peak_rss_mb"] - bare["rss_mb"],
        "libraries": {p: os.path.getsize(p) for p in _mapped_libraries() if os.path.isfile(p)},
    }


def run_child(spec: dict, timeout: float = 300) -> dict:
    """memory_child in a fresh interpreter (its peak is its own); its JSON line, or {"error": ...}."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.native_bench", "--child", json.dumps(spec)],
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"the memory child ({spec['engine']}) ran past {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip()[-600:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the section ------------------------------------------------------------------------------


def workers(plan: Plan, bundle: Path, lib: Path) -> list[pool.Worker]:
    """The library, the Python runtime (the decode rows' "edge-lora llama.cpp q4_0" spec) and llama.cpp's
    base decode (the decode rows' "llama.cpp q4_0")."""
    common = {"threads": plan.threads, "prompt": plan.prompt, "new_tokens": plan.new_tokens}
    ours = {"bundle": str(bundle), "adapters": ["a", "b"], "quant": QUANT, **common}
    return [
        pool.Worker(LIB, {"kind": "native", "library": str(lib), "n_ctx": 2048, **ours}, CASES),
        pool.Worker(PY, {"kind": "ours-llamacpp", "backend": "llamacpp", "extra_adapter": "", **ours}, CASES),
        pool.Worker(
            PEER,
            {"kind": "peer-llamacpp", "gguf": str(bundle / "gguf" / f"model-{QUANT}.gguf"), **common},
            ["base"],
        ),
    ]


def ratios(tok_s: dict) -> dict:
    """Paired (same-round) ratios: the library over the Python runtime per case, the library and the
    Python runtime over llama.cpp's base decode."""
    out = {
        f"lib/python {c}": paired_ratio(tok_s.get(f"{LIB}|{c}", []), tok_s.get(f"{PY}|{c}", []))
        for c in CASES
    }
    out["lib/llama.cpp base"] = paired_ratio(tok_s.get(f"{LIB}|base", []), tok_s.get(f"{PEER}|base", []))
    out["python/llama.cpp base"] = paired_ratio(tok_s.get(f"{PY}|base", []), tok_s.get(f"{PEER}|base", []))
    return out


def run(plan: Plan, bundle: Path | None = None, say=say) -> dict:
    """The section: {"skipped": line} where the library cannot be built, else the rounds, medians,
    ratios, the library's size and the two memory children."""
    lib, why = build_library()
    if lib is None:
        say(f"[native] skipped: {why}")
        return {"skipped": why}
    if bundle is None:
        from benchmarks import models

        bundle = models.prepare(SHAPE, plan.quants, say).bundle
    started = time.time()
    planned = workers(plan, bundle, lib)
    alive = pool.start_all(planned, say)
    try:
        decode = pool.rounds(alive, plan.native_rounds, say, fresh_every=FRESH_EVERY)
        memory_now = {w.label: {**w.ask("rss"), "after_load_rss_mb": w.info.get("rss_mb")} for w in alive}
        errors = {w.label: {"error": w.info.get("error")} for w in planned}  # before stop's own "quit"
    finally:
        for w in alive:
            w.stop()
    child = {
        "bundle": str(bundle),
        "library": str(lib),
        "threads": plan.threads,
        "prompt": plan.prompt,
        "new_tokens": plan.new_tokens,
    }
    memory = {
        label: run_child({**child, "engine": engine}) for label, engine in ((LIB, "native"), (PY, "python"))
    }
    tok_s = decode["tok_s"]
    return {
        "shape": SHAPE,
        "quant": QUANT,
        "threads": plan.threads,
        "prompt": plan.prompt,
        "new_tokens": plan.new_tokens,
        "rounds": plan.native_rounds,
        "fresh_every": FRESH_EVERY,
        "timing": "library: token-callback timestamps; the others: their decode rows' loops",
        "decode": decode,
        "medians": {k: median(v) for k, v in tok_s.items()},
        "prefill_ms": {k: median(v) for k, v in decode["prefill_ms"].items()},
        "ratios": ratios(tok_s),
        "library": library_size(lib),
        "memory": memory,
        "worker_memory": memory_now,
        "workers": errors,
        "wall_s": time.time() - started,
    }


def _fmt(v, digits=2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(native: dict) -> list[str]:
    """The Summary's "C library (native/)" section: decode rows, the two targets, size and memory."""
    if "skipped" in native or "error" in native:
        why = f"Skipped: {native['skipped']}" if "skipped" in native else f"Failed: {native['error']}"
        return ["### C library (native/)", "", why, ""]
    med, pre, r = native["medians"], native["prefill_ms"], native["ratios"]
    lines = [
        "### C library (native/)",
        "",
        f"{native['shape']} {native['quant']}, {native['threads']} threads, prompt {native['prompt']}, "
        f"{native['new_tokens']} decoded, {native['rounds']} interleaved rounds (medians; ratios paired per "
        f"round); each engine in its own process, a fresh one every {native.get('fresh_every', FRESH_EVERY)} "
        "rounds. "
        "The library's time per token is from its token callback.",
        "",
        "| engine | case | tok/s (median) | prefill ms |",
        "|---|---|---|---|",
    ]
    for key in sorted(med, key=lambda k: (CASES.index(k.split("|")[1]), -(med[k] or 0))):
        engine, case = key.split("|")
        lines.append(f"| {engine} | {case} | {_fmt(med[key], 1)} | {_fmt(pre.get(key), 0)} |")
    failed = {label: w["error"] for label, w in native.get("workers", {}).items() if w.get("error")}
    if failed:
        lines += [""] + [
            f"{label} did not run: {err.splitlines()[-1][:200]}" for label, err in failed.items()
        ]
    lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
    for case in CASES:
        lines.append(
            _target_row(f"library / Python runtime ({case})", r.get(f"lib/python {case}"), GOAL_VS_PYTHON)
        )
    lines.append(_target_row("library / llama.cpp (base)", r.get("lib/llama.cpp base"), GOAL_VS_LLAMA))
    lines.append(
        f"| Python runtime / llama.cpp (base), for reference | {_fmt(r.get('python/llama.cpp base'))} | | |"
    )
    lib = native["library"]
    stripped = f", {lib['stripped_bytes']:,} stripped" if lib.get("stripped_bytes") else ""
    deps = {
        Path(path).name: size
        for path, size in native["memory"].get(LIB, {}).get("libraries", {}).items()
        if "edge_lora" not in Path(path).name
    }
    loads = (
        f" It loads llama.cpp's libraries ({', '.join(sorted(deps))}: {sum(deps.values()):,} bytes, "
        "the ones llama-cpp-python installed)."
        if deps
        else ""
    )
    lines += ["", f"libedge_lora.so: {lib['bytes']:,} bytes{stripped}.{loads}"]
    for label, m in native["memory"].items():
        if "error" in m:
            lines.append(f"Peak RSS, {label}: n/a ({m['error'].splitlines()[-1][:200]}).")
            continue
        lines.append(
            f'Peak RSS of a fresh process, {label} (open, add "a", decode base and "a"): '
            f"{m['peak_rss_mb']:.0f} MB, {m['peak_above_interpreter_mb']:.0f} MB above the bare interpreter "
            f"({m['interpreter_mb']:.0f} MB; the rest: the engine, its libraries, numpy)."
        )
    return lines + [""]


def _target_row(name: str, value, goal: float) -> str:
    met = "n/a" if value is None else ("yes" if value >= goal else "**no**")
    return f"| {name} | {_fmt(value)} | >= {goal} | {met} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.native_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="the CI form's sizes: short requests, 3 rounds")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the plan's native_rounds)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--bundle",
        type=Path,
        help="an existing bundle with GGUF q4_0 and adapters a, b (default: the cached one)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the memory child (run_child)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(json.loads(args.child))), flush=True)
        return 0
    from benchmarks.plan import Plan

    plan = Plan.make(args.quick)
    if args.rounds:
        plan.native_rounds = args.rounds
    out = run(plan, args.bundle)
    print("\n".join(markdown(out)))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
