"""Decode speed of the settings whose best value depends on the core, for a real ARM board.

Emulation proves results, never speed, so the ARM rows of docs/mobile.md ("Linux boards") are empty
until someone runs this on a board. Torch-free: copy a bundle (the benchmark's SmolLM2-135M one,
``python -m benchmarks --quick`` builds it under ``$EDGE_LORA_BENCH_DIR/smollm2-135m/bundle``) and the
repo to the board, then

    python scripts/arm64_bench.py --bundle BUNDLE --label "Pi 5 (Cortex-A76)" --out pi5.json

Rows: llama.cpp q4_0 with repacking on and off (``use_extra_bufts``: on by default except on Intel
AMX; on ARM it selects q4_0_4x4/4x8/8x8), ONNX int4 at 1 thread and every core; each without an
adapter and with adapter "a". The same script on the x86 host gives the defaults' own rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPT = [5, 17, 42, 99, 3, 250, 12, 7] * 4


@dataclass(frozen=True)
class Setting:
    backend: str
    quant: str
    threads: int
    options: tuple = ()  # (name, value) pairs for runtime.load

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.backend} {self.quant}, {self.threads} thr" + (f", {extra}" if extra else "")


def settings(cores: int) -> list[Setting]:
    threads = sorted({1, cores})
    out = []
    for t in threads:
        out += [Setting("llamacpp", "q4_0", t, (("use_extra_bufts", on),)) for on in (True, False)]
        out.append(Setting("onnx", "int4", t))
    return out


def decode_rate(engine, tokens: int, adapters: dict) -> float:
    """Decode tokens per second, prefill excluded: (n - 1) tokens over the time past the first one."""
    from runtime.sampling import SamplingParams

    first = SamplingParams(max_new_tokens=1)
    params = SamplingParams(max_new_tokens=tokens)
    engine.generate_ids(PROMPT, first, adapters)  # warm-up
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        engine.generate_ids(PROMPT, first, adapters)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        n = len(engine.generate_ids(PROMPT, params, adapters))
        if n > 1:
            best = max(best, (n - 1) / max(time.perf_counter() - start - prefill, 1e-9))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, required=True, help="a bundle with onnx int4, gguf q4_0, adapter a"
    )
    parser.add_argument("--label", default=platform.machine(), help="the board, as the table row names it")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = parser.parse_args()
    import runtime

    rows = []
    for s in settings(os.cpu_count() or 1):
        engine = runtime.load(
            args.bundle, backend=s.backend, quant=s.quant, threads=s.threads, **dict(s.options)
        )
        base = decode_rate(engine, args.tokens, {})
        engine.add_adapter("a")
        lora = decode_rate(engine, args.tokens, {"a": 1.0})
        rows.append(
            {"board": args.label, **asdict(s), "base_tok_s": round(base, 1), "lora_tok_s": round(lora, 1)}
        )
        print(f"| {args.label} | {s.label} | {base:.1f} | {lora:.1f} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
