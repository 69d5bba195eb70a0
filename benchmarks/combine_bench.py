"""Decode with one combined adapter against the stacked set it replaces, on both backends.

The benchmark model's rank-16 adapters ``a`` and ``b`` (benchmarks.models, int4 / q4_0 bundle) run as the
stacked set {a: 1, b: 1}, as ``cat`` of the two (one rank-32 adapter: the same function) and as ``svd``
to rank 16 (one rank-16 adapter: an approximation). Engines run interleaved round by round through the
runtime's public ``generate_ids``; the row gives the median tokens/s, the speed against the stack, and
each adapter's rank and bytes (fp32 .safetensors). ``python -m benchmarks.combine_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

PROMPT = [5, 17, 40, 41, 9, 12, 30, 31]


def combined_files(model, out: Path) -> dict[str, Path]:
    """``cat`` and ``svd`` (rank 16) of a + b, written once next to the benchmark model."""
    from edge_lora.adapter import Adapter
    from edge_lora.combine import CombineConfig, Source, combine_to_file

    sources = [Source(n, Adapter.load(model.adapter_file(n)), 1.0) for n in ("a", "b")]
    files = {}
    for name, config in (("cat", CombineConfig("cat")), ("svd16", CombineConfig("svd", rank=16))):
        files[name] = out / f"ab-{name}.safetensors"
        if not files[name].is_file():
            combine_to_file(sources, config, files[name])
    return files


def rows(
    shape: str, rounds: int, tokens: int, threads: int, backends: tuple = ("onnx", "llamacpp"), say=print
) -> list[dict]:
    import runtime
    from benchmarks.models import prepare
    from edge_lora.adapter import Adapter
    from runtime.sampling import SamplingParams

    model = prepare(shape, {"onnx": ["int4"], "gguf": ["q4_0"]}, say=say)
    files = combined_files(model, model.root / "combined")
    cases = {"stack a+b": {"a": 1.0, "b": 1.0}, "cat a+b": {"cat": 1.0}, "svd16 a+b": {"svd16": 1.0}}
    out = []
    for backend, quant in (("onnx", "int4"), ("llamacpp", "q4_0")):
        if backend not in backends:
            continue
        engine = runtime.load(model.bundle, backend=backend, quant=quant, threads=threads)
        for name in ("a", "b"):
            engine.add_adapter(name)
        for name, path in files.items():
            engine.add_adapter(name, path)
        params = SamplingParams(max_new_tokens=tokens)
        rates: dict[str, list[float]] = {c: [] for c in cases}
        for _ in range(rounds):
            for case, chosen in cases.items():  # interleaved: the machine's drift hits every case alike
                t0 = time.perf_counter()
                produced = engine.generate_ids(PROMPT, params, adapters=chosen)
                rates[case].append(len(produced) / (time.perf_counter() - t0))
        stack = statistics.median(rates["stack a+b"])
        for case, chosen in cases.items():
            paths = [files[n] if n in files else model.adapter_file(n) for n in chosen]
            ranks = [max(w.rank for w in Adapter.load(p).modules.values()) for p in paths]
            rate = statistics.median(rates[case])
            out.append(
                {
                    "backend": f"{backend} {quant}",
                    "case": case,
                    "tok_s": round(rate, 1),
                    "vs_stack": round(rate / stack, 3),
                    "rank": "+".join(map(str, ranks)),
                    "bytes": sum(p.stat().st_size for p in paths),
                }
            )
        close = getattr(engine, "close", None)
        if close:
            close()
    return out


def format_rows(table: list[dict]) -> str:
    lines = [
        f"{'backend':14s} {'adapters':11s} {'tok/s':>7s} {'vs stack':>8s} {'rank':>6s} {'MB (fp32)':>9s}"
    ]
    for r in table:
        lines.append(
            f"{r['backend']:14s} {r['case']:11s} {r['tok_s']:7.1f} {r['vs_stack']:8.3f} {r['rank']:>6s} "
            f"{r['bytes'] / 1e6:9.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--quick", action="store_true", help="3 rounds of 16 tokens")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rounds, tokens = (3, 16) if args.quick else (args.rounds, args.tokens)
    for backend in ("onnx", "llamacpp"):  # each backend's rows as soon as they are measured
        print(format_rows(rows(args.shape, rounds, tokens, args.threads, (backend,))), flush=True)


if __name__ == "__main__":
    main()
