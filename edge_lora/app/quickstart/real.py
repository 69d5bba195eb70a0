"""`edge-lora quickstart --model smollm2`: the real pipeline, end to end, on a real trained model.

The stages, each timed (wall and this process's CPU seconds), as a user would run them by hand:

1. fetch the named model (:mod:`edge_lora.app.quickstart.models`; cached after the first run);
2. make the real task (:mod:`edge_lora.app.real_task`: which licence a passage is from);
3. calibrate and export the base once, as ``edge-lora export`` does by default (``--calibration auto``:
   4-bit scales fitted on text, ``importance.safetensors`` kept in the bundle; ONNX int4, GGUF q4_0);
4. train one adapter against that exact base (``--base-quant q4_0 --base-importance BUNDLE``);
5. add it to the bundle (``export --add-adapter``);
6. on each backend: held-out accuracy of the base and of the adapter, the greedy answers to a few
   passages before and after the adapter, and one chat answer through the model's chat template.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.app.quickstart.models import NamedModel
from edge_lora.app.quickstart.real_report import format_real_json, format_real_table, real_checks
from edge_lora.atomic import atomic_write_text

if TYPE_CHECKING:
    from collections.abc import Iterator

    from converters.export import ExportOptions
    from runtime.engine import Engine

ADAPTER = "licence"
TRAINED_ON = "q4_0"  # the --base-quant the adapter is trained against: the GGUF base, bit for bit
ENGINES = {"gguf": "llamacpp", "onnx": "onnx"}  # bundle backend -> runtime backend, llama.cpp first


@dataclass
class RealConfig:
    model: NamedModel
    work_dir: Path | None = None
    backends: list[str] = field(default_factory=lambda: ["onnx", "gguf"])
    # 120 steps of 8 = 3.3 epochs of the 288 training passages: the licence task's held-out accuracy
    # has settled by then (benchmarks/qat_bench.py trains 150 at the same rate; 4e-3 diverged there)
    steps: int = 120
    batch_size: int = 8
    lr: float = 2e-3
    rank: int = 8
    alpha: float = 16.0
    eval_items: int = 0  # held-out passages scored per backend; 0 = all of them
    examples: int = 4  # passages shown with their answers (the held-out list cycles through the labels)
    calibration_tokens: int | None = None  # None: the export's default
    question: str = "What is the capital of France?"
    threads: int = 0  # 0 = auto (resolve_threads), for calibration, training and the runtime
    device: str = "auto"
    json: bool = False

    @classmethod
    def for_args(cls, args: argparse.Namespace, model: NamedModel) -> RealConfig:
        config = cls(
            model=model,
            work_dir=Path(args.work_dir) if args.work_dir else None,
            backends=[b.strip() for b in args.backends.split(",") if b.strip()],
            threads=args.threads,
            device=args.device,
            json=args.json,
        )
        if args.fast:  # fewer held-out passages scored; training as it is
            config.eval_items = 40
        if args.steps:
            config.steps = args.steps
        if args.eval_items:
            config.eval_items = args.eval_items
        return config


class Stages:
    """Wall and CPU seconds per named stage, announced on stderr as they start and end."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = {}

    @contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        _say(f"{what} ...")
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        took = {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}
        self.seconds[name] = took
        _say(f"  {name}: {took['wall_s']:.1f} s")


def resolve_threads(requested: int) -> tuple[int, str]:
    """Threads for every stage, and why. 0 = every core on a quiet machine, one when the load average
    says other jobs hold the cores: OpenMP's threads spin-wait against them (a training step on a busy
    2-core machine took 25-45 s with 2 threads against 4.5 s with one)."""
    cores = os.cpu_count() or 1
    if requested > 0:
        return requested, "as asked"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= 0.75 * cores:
        return 1, f"the machine is busy: load average {load:.1f} on {cores} cores"
    return cores, f"load average {load:.1f} on {cores} cores"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def real_quickstart(config: RealConfig) -> int:
    start = time.perf_counter()
    work = config.work_dir or Path(tempfile.mkdtemp(prefix="edge-lora-quickstart-real-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = _run(config, work)
    finally:
        if config.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary["total_s"] = round(time.perf_counter() - start, 1)
    if config.work_dir is not None:  # kept with the bundle and the adapter
        atomic_write_text(work / "summary.json", format_real_json(summary) + "\n")
    print(format_real_json(summary) if config.json else format_real_table(summary))
    return 0 if all(c["ok"] for c in summary["checks"]) else 1


def _run(config: RealConfig, work: Path) -> dict:
    import torch

    from converters.export import AdapterSource, add_adapter
    from edge_lora.app.real_task import SOURCE, make_task, read_examples

    threads, why = resolve_threads(config.threads)
    config = dataclasses.replace(config, threads=threads)
    torch.set_num_threads(threads)  # the calibration's passes as well as the training
    _say(f"{threads} thread(s): {why}")
    stages = Stages()
    with stages("fetch", f"fetching {config.model.title} (cached after the first run)"):
        model_dir = config.model.fetch()
    with stages("task", "making the licence task from the licence texts"):
        task = make_task(work / "task")
        held_out = read_examples(task.held_out)
    scored = held_out[: config.eval_items] if config.eval_items else held_out
    bundle, calibration = _export(config, model_dir, work / "bundle", stages)
    adapter_path = work / f"{ADAPTER}.safetensors"
    what = f"training adapter {ADAPTER!r} against the {TRAINED_ON} base ({config.steps} steps)"
    with stages("train", what):
        trained = _train(config, model_dir, task.train, bundle, adapter_path)
    with stages("add adapter", "adding it to the bundle"):
        add_adapter(bundle, AdapterSource(adapter_path, ADAPTER), show_progress=False)
    runs = []
    for backend, quant in _exported(bundle, config.backends):
        with stages(f"{ENGINES[backend]} {quant}", f"scoring on {ENGINES[backend]} {quant}"):
            runs.append(_exercise(bundle, ENGINES[backend], quant, config, scored, held_out))
    summary = {
        "model": {"name": config.model.name, "title": config.model.title, "source": config.model.source},
        "task": {"source": SOURCE, **task.counts, "labels": task.labels, "scored": len(scored)},
        "adapter": {
            "name": ADAPTER,
            "rank": config.rank,
            "alpha": config.alpha,
            "targets": "all-linear",
            "steps": config.steps,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "base_quant": TRAINED_ON,
            "final_loss": trained["final_loss"],
        },
        "calibration": calibration,
        "runs": runs,
        "threads": {"threads": threads, "why": why},
        "timings": stages.seconds,
        "work_dir": str(work) if config.work_dir else "(temporary, removed)",
    }
    summary["checks"] = real_checks(summary)
    return summary


def _export(config: RealConfig, model_dir: Path, out: Path, stages: Stages) -> tuple[Path, dict | None]:
    """The base bundle at the export's defaults (4-bit both backends, calibrated); its calibration."""
    from converters.export import ExportOptions, export_bundle
    from edge_lora.app.calibration import CALIBRATION_TOKENS, export_importance

    options = ExportOptions(backends=config.backends, force=True)
    quants = [*options.onnx_quants, *options.gguf_quants]
    tokens = config.calibration_tokens or CALIBRATION_TOKENS
    with stages("calibrate", f"calibrating the 4-bit scales on {tokens} tokens of text"):
        options.importance = export_importance("auto", model_dir, quants, tokens=tokens, say=_say)
    what = ", ".join(f"{b} {'/'.join(q)}" for b, q in _quants(options).items())
    with stages("export", f"exporting the base once ({what})"):
        export_bundle(model_dir, out, [], options, show_progress=False)
    from edge_lora.bundle import Bundle

    return out, Bundle.open(out).raw.get("calibration")


def _quants(options: ExportOptions) -> dict[str, list[str]]:
    chosen = {"onnx": options.onnx_quants, "gguf": options.gguf_quants}
    return {b: chosen[b] for b in ENGINES if b in options.backends}


def _exported(bundle: Path, backends: list[str]) -> list[tuple[str, str]]:
    """``(backend, quant)`` of every base in the bundle, llama.cpp first."""
    from edge_lora.bundle import Bundle

    files = Bundle.open(bundle).backends
    return [(b, entry["quant"]) for b in ENGINES if b in backends for entry in files.get(b, [])]


def _train(config: RealConfig, model_dir: Path, data: Path, bundle: Path, out: Path) -> dict:
    """One adapter, trained in this process against the bundle's own q4_0 base (its calibration too)."""
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.trainer import train

    settings = dict(
        model=str(model_dir),
        data=str(data),
        out=str(out),
        base_quant=TRAINED_ON,
        base_importance=str(bundle),
        compute_dtype="fp32",  # bf16 would round the device's 4-bit values: not the device's base any more
        rank=config.rank,
        alpha=config.alpha,
        lr=config.lr,
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=128,  # a passage and its answer are ~25 tokens
        eval_split=0,  # the held-out passages are scored on the device instead
        threads=config.threads,
        progress=sys.stderr.isatty(),
    )
    summary = train(TrainConfig.from_dict(settings))
    log = Path(str(out) + ".log.jsonl")  # the trainer's metrics, one line per step
    losses = [r["loss"] for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "train"]
    return {**summary, "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4)}


def _exercise(
    bundle: Path, backend: str, quant: str, config: RealConfig, scored: list[dict], held_out: list[dict]
) -> dict:
    """Accuracy before and after the adapter on one backend, a few answers, and a chat answer."""
    import runtime
    from edge_lora.app.real_task import accuracy

    options = {"quant": quant, **({"threads": config.threads} if config.threads else {})}
    engine = runtime.load(bundle, backend=backend, device=config.device, **options)
    try:
        engine.add_adapter(ADAPTER)
        on = {ADAPTER: 1.0}
        return {
            "backend": engine.backend_name,
            "quant": quant,
            "device": engine.info()["device"]["name"],
            "accuracy": {"base": accuracy(engine, scored, {}), "adapter": accuracy(engine, scored, on)},
            "examples": [
                {
                    "prompt": r["prompt"],
                    "truth": r["completion"].strip(),
                    "base": _answer(engine, r["prompt"], {}),
                    "adapter": _answer(engine, r["prompt"], on),
                }
                for r in held_out[: config.examples]
            ],
            "chat": {
                "question": config.question,
                "base": _chat(engine, config.question, {}),
                "adapter": _chat(engine, config.question, on),
            },
        }
    finally:
        close = getattr(engine, "close", None)
        if close:
            close()


def _answer(engine: Engine, prompt: str, adapters: dict[str, float]) -> str:
    """The greedy continuation of a task prompt, to the end of its line."""
    return engine.generate(prompt, max_new_tokens=6, adapters=adapters, stop=["\n"]).strip()


def _chat(engine: Engine, question: str, adapters: dict[str, float]) -> str:
    """One greedy reply through the model's own chat template, stopped at its end-of-turn token."""
    from edge_lora.app.conversation import Conversation

    chat = Conversation(engine, keep_history=False)
    ids = chat.prompt(question)
    reply = engine.generate(
        ids, max_new_tokens=48, adapters=adapters, stop=chat.stop_text, stop_token_ids=chat.stop_ids
    )
    return reply.strip()
