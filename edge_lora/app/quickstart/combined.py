"""The quickstart's combined adapter: the composing pair (the first task + the style) made one adapter by
``cat`` (edge_lora/combine.py), exported with the others, scored like the stack on every exported base.

``cat`` of {task: 1, style: 1} is the stacked set's function in one adapter, so it must keep both effects
as the stack does, on runtimes that run one adapter at a time (onnxruntime-genai, a llama.cpp app).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.app.quickstart.tasks import END, score

if TYPE_CHECKING:
    from runtime.engine import Engine


def combine_pair(work: Path, adapters: dict[str, Path], task: str, style: str) -> tuple[str, Path]:
    """``(name, path)`` of ``cat`` of {task: 1, style: 1}, written under ``work``."""
    from edge_lora.adapter import Adapter
    from edge_lora.combine import CombineConfig, Source, combine_to_file

    name = f"{task}.{style}"
    sources = [Source(n, Adapter.load(adapters[n]), 1.0, path=str(adapters[n])) for n in (task, style)]
    path = work / f"{name}.safetensors"
    combine_to_file(sources, CombineConfig("cat"), path)
    return name, path


def combined_accuracy(engine: Engine, name: str, scored: list) -> float:
    """The combined adapter alone on the stack's scored items (the task's answers in the style)."""
    engine.add_adapter(name)
    return score(
        lambda prompt: engine.generate(prompt, max_new_tokens=8, adapters={name: 1.0}, stop=[END]), scored
    )


def combined_checks(summary: dict) -> list[dict]:
    info = summary.get("combined")
    if not info:
        return []
    return [
        {
            "what": f"{r['backend']} {r['quant']} combined {info['name']} (cat of {info['stack']}, one "
            f"adapter): {r['combined']:.0f}% answers with both effects (>= 90)",
            "ok": r["combined"] >= 90.0,
        }
        for r in summary["runs"]
        if "combined" in r
    ]


def combined_lines(summary: dict) -> list[str]:
    info = summary.get("combined")
    if not info:
        return []
    cells = ", ".join(
        f"{r['backend']} {r['quant']} {r['combined']:.1f}%" for r in summary["runs"] if "combined" in r
    )
    return [f"  combined {info['name']} = cat of stack {info['stack']}, run as one adapter: {cells}"]
