"""The quickstart's orchestration: train, export, then exercise the runtime on every exported base.

Each step is timed; accuracy is exact match on held-out prompts (words never trained on), greedy.
The summary checks the targets: each task adapter lifts its task from near zero to >= 90%, and
stays within 2 points of the fp32 host model after int8/q8_0 export and within 5 after int4/q4_0;
the style adapter stacked on a task adapter keeps both effects (>= 90%) on every backend.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.app.quickstart.combined import combine_pair, combined_accuracy, combined_checks
from edge_lora.app.quickstart.finetune import FinetuneConfig, host_score, train_adapter
from edge_lora.app.quickstart.report import format_json, format_table
from edge_lora.app.quickstart.tasks import END, STYLES, TASKS, score
from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    from runtime.engine import Engine

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "assets" / "default_model"
TOLERANCE = {"int8": 2.0, "q8_0": 2.0, "int4": 5.0, "q4_0": 5.0}  # points below the fp32 adapter
# texts that split differently when a tokenizer is mapped wrong: leading/inner runs of spaces, tabs and
# newlines, digits, accents, CJK, emoji (byte fallback); the task prompts are added to them
TOKENIZER_PROBES = [
    "Hello world",
    " Hello  world",
    "\tTabs\nand\n\nnew lines",
    "Grüße aus Köln, 東京 🙂",
    "numbers 1234567 and 3.14",
    "    indented(code) == 42;",
]


@dataclass
class QuickstartConfig:
    model: Path = DEFAULT_MODEL
    work_dir: Path | None = None
    backends: list[str] = field(default_factory=lambda: ["onnx", "gguf"])
    onnx_quants: list[str] = field(default_factory=lambda: ["int8", "int4"])
    gguf_quants: list[str] = field(default_factory=lambda: ["q8_0", "q4_0"])
    steps: int = 600  # 300 reach ~95% in fp32; the extra margin is what keeps int4/q4_0 within 5 points
    eval_items: int = 50
    threads: int = 0
    device: str = "auto"  # where the runtime runs the bundle: cpu, gpu, or auto (a hardware GPU if any)
    json: bool = False
    decode_tokens: int = 48

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> QuickstartConfig:
        config = cls(
            model=Path(args.model) if args.model else DEFAULT_MODEL,
            work_dir=Path(args.work_dir) if args.work_dir else None,
            backends=[b.strip() for b in args.backends.split(",") if b.strip()],
            threads=args.threads,
            json=args.json,
            device=args.device,
        )
        if args.fast:  # the CI form: every quantization, fewer held-out prompts
            config.eval_items = 25
        if args.steps:
            config.steps = args.steps
        if args.eval_items:
            config.eval_items = args.eval_items
        return config


def _say(config: QuickstartConfig, text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def quickstart(config: QuickstartConfig) -> int:
    if not (Path(config.model) / "config.json").is_file():
        raise EdgeLoraError(
            "no model here", path=config.model, hint="pass --model with a Hugging Face model directory"
        )
    start = time.perf_counter()
    work = config.work_dir or Path(tempfile.mkdtemp(prefix="edge-lora-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = _run(config, work, start)
    finally:
        if config.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(format_json(summary) if config.json else format_table(summary))
    return 0 if all(c["ok"] for c in summary["checks"]) else 1


def _run(config: QuickstartConfig, work: Path, start: float) -> dict:
    tasks, styles = list(TASKS), list(STYLES)
    items = {t: TASKS[t].examples(config.eval_items, "eval") for t in tasks}
    items.update({s: STYLES[s].examples(config.eval_items, "eval") for s in styles})
    adapters, train_s = _train_adapters(config, work)
    combined, combined_path = combine_pair(work, adapters, tasks[0], styles[0])
    adapters[combined] = combined_path  # exported with the others
    _say(config, "scoring the fp32 host model ...")
    host = {
        "base": {t: host_score(config.model, items[t]) for t in [*tasks, *styles]},
        "adapter": {t: host_score(config.model, items[t], adapters[t]) for t in [*tasks, *styles]},
        "base_unstyled": {s: host_score(config.model, STYLES[s].unstyled(items[s])) for s in styles},
    }
    _say(config, "exporting the bundle ...")
    bundle, export_s = _export(config, work, adapters)
    tokenizer = _tokenizer_agreement(bundle, [prompt for t in tasks for prompt, _ in items[t][:3]])
    stacks = _stacks(tasks, styles, items)
    runs = []
    for backend, quants in (("onnx", config.onnx_quants), ("gguf", config.gguf_quants)):
        if backend not in config.backends:
            continue
        for i, quant in enumerate(quants):
            _say(config, f"runtime: {backend} {quant} ...")
            engine = "onnx" if backend == "onnx" else "llamacpp"
            measured = stacks if i == 0 else None
            scored = stacks[f"{tasks[0]}+{styles[0]}"]["items"][tasks[0]]  # the composing pair's items
            run = _exercise(
                bundle, engine, quant, [*tasks, *styles], items, config, measured, (combined, scored)
            )
            runs.append(run)
    summary = {
        "model": str(config.model),
        "bundle": str(bundle) if config.work_dir else "(temporary, removed)",
        "tasks": tasks,
        "styles": styles,
        "eval_items": config.eval_items,
        "host": host,
        "runs": runs,
        "timings": {"train_s": train_s, "export_s": export_s},
        "tokenizer": tokenizer,
        "stacks": {
            name: {"adapters": list(s["adapters"]), "composes": s["composes"]} for name, s in stacks.items()
        },
        "combined": {"name": combined, "stack": f"{tasks[0]}+{styles[0]}"},
    }
    summary["checks"] = _checks(summary)
    summary["total_s"] = round(time.perf_counter() - start, 1)
    return summary


def _train_adapters(config: QuickstartConfig, work: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Every task and style adapter trained on the host: their paths and seconds each."""
    adapters, seconds = {}, {}
    for name, task in [*TASKS.items(), *STYLES.items()]:
        _say(config, f"training adapter {name!r} ({task.description}) ...")
        steps = config.steps if name in TASKS else config.steps * 2 // 3  # a format on one layer learns fast
        result = train_adapter(
            config.model,
            task,
            work / f"{name}.safetensors",
            FinetuneConfig(steps=steps, threads=config.threads),
            log=lambda s: _say(config, s),
        )
        adapters[name] = result.path
        seconds[name] = round(result.seconds, 2)
    return adapters, seconds


def _export(config: QuickstartConfig, work: Path, adapters: dict[str, Path]) -> tuple[Path, float]:
    """The bundle with every adapter, and the seconds the export took."""
    from converters.export import AdapterSource, ExportOptions, export_bundle

    start = time.perf_counter()
    bundle = work / "bundle"
    options = ExportOptions(
        backends=config.backends, onnx_quants=config.onnx_quants, gguf_quants=config.gguf_quants, force=True
    )
    sources = [AdapterSource(p, n) for n, p in adapters.items()]
    export_bundle(config.model, bundle, sources, options, show_progress=False)
    return bundle, round(time.perf_counter() - start, 2)


def _stacks(tasks: list[str], styles: list[str], items: dict) -> dict:
    """The stacked sets the quickstart measures, each with the items its answers are scored on.

    A task adapter with a style adapter composes: the task's answers in the style (both effects).
    Two task adapters that rewrite the same letters conflict: each task is scored as it is."""
    stacks = {}
    for style in styles:
        stacks[f"{tasks[0]}+{style}"] = {
            "adapters": {tasks[0]: 1.0, style: 1.0},
            "composes": True,
            "items": {tasks[0]: STYLES[style].styled(items[tasks[0]])},
        }
    if len(tasks) > 1:
        stacks[f"{tasks[0]}+{tasks[1]}"] = {
            "adapters": {tasks[0]: 1.0, tasks[1]: 1.0},
            "composes": False,
            "items": {t: items[t] for t in tasks[:2]},
        }
    return stacks


def _tokenizer_agreement(bundle: Path, prompts: list[str]) -> dict | None:
    """The tokenizer's style, and on how many texts llama.cpp's own tokenizer on the exported GGUF gives the
    ids of the runtime's tokenizer (which both runtime backends use), special tokens added as in a request."""
    from converters.gguf_tokenizer import gguf_tokenizer_style
    from edge_lora.bundle import Bundle
    from runtime.llamacpp.lib import tokenize_with_gguf
    from runtime.tokenizer import Tokenizer

    opened = Bundle.open(bundle)
    if not opened.backends.get("gguf"):
        return None
    gguf = bundle / opened.backends["gguf"][0]["model"]
    texts = TOKENIZER_PROBES + prompts
    runtime_ids = [Tokenizer(bundle / opened.tokenizer["tokenizer"]).encode(text) for text in texts]
    llama_ids = tokenize_with_gguf(gguf, texts, add_special=True, parse_special=True)
    return {
        "style": gguf_tokenizer_style(gguf),
        "texts": len(texts),
        "equal": sum(a == b for a, b in zip(runtime_ids, llama_ids)),
        "differing": [t for t, a, b in zip(texts, runtime_ids, llama_ids) if a != b],
    }


def _exercise(
    bundle: Path,
    backend: str,
    quant: str,
    tasks: list[str],
    items: dict,
    config: QuickstartConfig,
    stacks: dict | None,
    combined: tuple[str, list] | None = None,
) -> dict:
    """Accuracy of the base and of each adapter on one exported base; with ``stacks`` also the
    stacked sets and a merge (run once per backend)."""
    import runtime

    options = {"quant": quant}
    threads = config.threads or (1 if engine_is_tiny(bundle) else 0)  # a tiny model only pays for thread sync
    if threads:
        options["threads"] = threads
    t0 = time.perf_counter()
    engine = runtime.load(bundle, backend=backend, device=config.device, **options)
    t1 = time.perf_counter()
    for name in tasks:
        engine.add_adapter(name)
    t2 = time.perf_counter()

    def accuracy(task: str, adapters: dict[str, float], scored: list | None = None) -> float:
        scored = items[task] if scored is None else scored
        return score(
            lambda prompt: engine.generate(prompt, max_new_tokens=8, adapters=adapters, stop=[END]), scored
        )

    run = {
        "backend": engine.backend_name,
        "device": engine.info()["device"]["name"],
        "quant": quant,
        "load_s": round(t1 - t0, 4),
        "add_adapters_s": round(t2 - t1, 4),
        "base": {t: accuracy(t, {}) for t in tasks},
        "adapter": {t: accuracy(t, {t: 1.0}) for t in tasks},
    }
    if combined:  # the composing pair as one adapter, scored like its stack
        run["combined"] = combined_accuracy(engine, *combined)
    run["swap_ms"] = _swap_ms(engine, tasks, items)
    run["tokens_per_s"] = _tokens_per_s(engine, tasks[0], items, config.decode_tokens)
    if stacks:
        run["stacked"] = {
            name: {t: accuracy(t, s["adapters"], scored) for t, scored in s["items"].items()}
            for name, s in stacks.items()
        }
        engine.merge(tasks[0], 1.0)
        run["merged"] = accuracy(tasks[0], {})
    close = getattr(engine, "close", None)
    if close:
        close()
    return run


def engine_is_tiny(bundle: Path) -> bool:
    from edge_lora.bundle import Bundle

    return Bundle.open(bundle).config.hidden_size <= 256


def _swap_ms(engine: Engine, tasks: list[str], items: dict, rounds: int = 10) -> float:
    """Latency of a one-token request whose adapter differs from the previous request's."""
    prompt = items[tasks[0]][0][0]
    engine.generate(prompt, max_new_tokens=1, adapters={tasks[0]: 1.0})
    start = time.perf_counter()
    for i in range(rounds):
        engine.generate(prompt, max_new_tokens=1, adapters={tasks[i % len(tasks)]: 1.0})
    return round(1000 * (time.perf_counter() - start) / rounds, 3)


def _tokens_per_s(engine: Engine, task: str, items: dict, n: int) -> float:
    from runtime.sampling import SamplingParams

    ids = engine.tokenizer.encode(items[task][0][0])
    params = SamplingParams(max_new_tokens=n)
    engine.generate_ids(ids, SamplingParams(max_new_tokens=2), adapters={task: 1.0})  # warm-up
    start = time.perf_counter()
    out = engine.generate_ids(ids, params, adapters={task: 1.0})
    return round(len(out) / max(time.perf_counter() - start, 1e-9), 1)


def _checks(summary: dict) -> list[dict]:
    checks = []
    tok = summary.get("tokenizer")
    if tok:
        checks.append(
            {
                "what": f"tokenizer {tok['style']}: runtime and llama.cpp's tokenizer on the GGUF give "
                f"the same ids on {tok['equal']}/{tok['texts']} texts",
                "ok": tok["equal"] == tok["texts"],
            }
        )
    host = summary["host"]
    for t in summary["tasks"]:
        checks.append(
            {
                "what": f"fp32 adapter {t}: base {host['base'][t]:.0f}% -> {host['adapter'][t]:.0f}% (>= 90)",
                "ok": host["adapter"][t] >= 90.0 and host["base"][t] <= 10.0,
            }
        )
        for r in summary["runs"]:
            tol = TOLERANCE.get(r["quant"], 5.0)
            drop = host["adapter"][t] - r["adapter"][t]
            checks.append(
                {
                    "what": f"{r['backend']} {r['quant']} adapter {t}: {r['adapter'][t]:.0f}% "
                    f"(within {tol:.0f} of fp32)",
                    "ok": drop <= tol,
                }
            )
    for s in summary["styles"]:  # a style keeps what the base gets right, in the style
        plain = host["base_unstyled"][s]
        checks.append(
            {
                "what": f"fp32 style {s}: base {host['base'][s]:.0f}% -> {host['adapter'][s]:.0f}% of the "
                f"base's own tasks in the style (the base answers {plain:.0f}% of them right unstyled; "
                "within 10)",
                "ok": host["adapter"][s] >= plain - 10.0 and host["base"][s] <= 10.0,
            }
        )
    for name, stack in summary["stacks"].items():
        if not stack["composes"]:
            continue
        for r in summary["runs"]:
            for t, value in (r.get("stacked") or {}).get(name, {}).items():
                checks.append(
                    {
                        "what": f"{r['backend']} {r['quant']} stacked {name}: {value:.0f}% of {t} answers "
                        "with both effects (>= 90)",
                        "ok": value >= 90.0,
                    }
                )
    return checks + combined_checks(summary)
