"""What new tokens cost per decoded token, on a random-weight SmolLM2-135M shape (tied head).

ONNX: the LoRA graph with the new-token nodes (a Gather on the added rows table, the
head Concat of ``x @ rows^T``) against the same graph built without them, both int4 fast, each
running one rank-16 adapter without new tokens (what the nodes cost everyone else), plus the graph
with an adapter that adds 2 tokens (what they cost their users). llama.cpp (q4_0): the same adapter
with and without 2 new tokens (hidden states switched on, logits of the new tokens in numpy).
Engines run interleaved, rounds paired; medians of tokens/s. ``python -m benchmarks.new_tokens_bench``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _export(hf: Path, out: Path, with_added: bool) -> Path:
    from converters.export import AdapterSource, ExportOptions, export_bundle
    from converters.onnx_decoder import DecoderWriter

    saved = DecoderWriter.embed, DecoderWriter.added_logits
    if not with_added:  # the graph as it was before new tokens: plain embedding Gather, base logits
        DecoderWriter.embed = DecoderWriter.base_embed
        DecoderWriter.added_logits = lambda self, x, logits: logits
    try:
        options = ExportOptions(
            backends=["onnx", "gguf"] if with_added else ["onnx"],
            onnx_quants=["int4"],
            gguf_quants=["q4_0"],
            force=True,
        )
        return export_bundle(
            hf,
            out,
            [AdapterSource(p, p.stem) for p in sorted(out.parent.glob("*.safetensors"))],
            options,
            show_progress=False,
        )
    finally:
        DecoderWriter.embed, DecoderWriter.added_logits = saved


def _adapters(hf: Path, folder: Path) -> None:
    from benchmarks.gguf_bench import random_adapter
    from edge_lora.model_dir import ModelDir

    md = ModelDir(hf)
    plain = random_adapter(md, 1, 16)
    plain.save(folder / "a.safetensors")
    rng = np.random.default_rng(3)
    plain.added_tokens = ["<sql>", "</sql>"]
    plain.embed_rows = rng.normal(0, 0.05, (2, md.config.hidden_size)).astype(np.float32)
    if not md.config.tie_word_embeddings:
        plain.head_rows = rng.normal(0, 0.05, (2, md.config.hidden_size)).astype(np.float32)
    plain.save(folder / "t.safetensors")


def _steps(engines: dict, prompt: list[int], n: int) -> dict[str, list[float]]:
    """Seconds per decode step of each engine, the engines alternating step by step (load noise hits
    them alike); each feeds the same token after the same prompt."""
    states = {}
    for label, (engine, chosen) in engines.items():
        _, loaded = engine._request_set(chosen)
        states[label] = engine._new_state(dict(chosen), loaded)
        states[label].feed(prompt)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(n):
        for label, state in states.items():
            start = time.perf_counter()
            state.feed([42])
            times[label].append(time.perf_counter() - start)
    for state in states.values():
        state.close()
    return times


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hf", type=Path, help="a model directory (default: a random SmolLM2-135M shape)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64, help="decode steps per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["onnx", "llamacpp"], help="one backend's rows")
    p.add_argument("--work", type=Path, help="reuse (or keep) the exports in this folder")
    return p


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    import runtime
    from benchmarks.gguf_bench import SHAPES, make_random_model

    work = args.work or Path(tempfile.mkdtemp(prefix="edge-lora-newtok-"))
    work.mkdir(parents=True, exist_ok=True)
    before, after = work / "before", work / "after"
    if not (after / "bundle.json").is_file():
        hf = args.hf or make_random_model(SHAPES["smollm2-135m"], work / "hf")
        _adapters(hf, work)
        before, after = _export(hf, before, False), _export(hf, after, True)
    print(f"exports in {work}")

    def onnx(root):
        return runtime.load(root, backend="onnx", threads=args.threads, spin=False)

    def llama(root):
        return runtime.load(root, backend="llamacpp", threads=args.threads)

    plan = {
        "onnx before |a": (onnx, before, {"a": 1.0}),
        "onnx after |a": (onnx, after, {"a": 1.0}),
        "onnx after |a+2 tokens": (onnx, after, {"t": 1.0}),
        "llamacpp |a": (llama, after, {"a": 1.0}),
        "llamacpp |a+2 tokens": (llama, after, {"t": 1.0}),
    }
    engines = {
        k: (load(root), chosen)
        for k, (load, root, chosen) in plan.items()
        if not args.only or k.startswith(args.only)
    }
    for engine, chosen in engines.values():
        for name in chosen:
            engine.add_adapter(name)
    prompt = [5, 17, 40, 41, 9, 12, 30, 31]
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for label, values in _steps(engines, prompt, args.tokens).items():
            times[label] += values
    _print_rates(times)


def _print_rates(times: dict[str, list[float]]) -> None:
    """Each engine's median rate, then each pair's paired speed ratio and time difference per token."""
    for label, values in times.items():
        print(
            f"{label:28s} {1 / statistics.median(values):8.1f} tok/s "
            f"(median step {1e6 * statistics.median(values):.0f} us)"
        )
    for a, b in (
        ("onnx after |a", "onnx before |a"),
        ("onnx after |a+2 tokens", "onnx after |a"),
        ("llamacpp |a+2 tokens", "llamacpp |a"),
    ):
        if a in times and b in times:
            diff = statistics.median(x - y for x, y in zip(times[a], times[b]))
            ratio = statistics.median(y / x for x, y in zip(times[a], times[b]))
            print(f"{a} vs {b}: speed ratio {ratio:.3f}, {1e6 * diff:+.0f} us per token (paired medians)")


if __name__ == "__main__":
    main()
