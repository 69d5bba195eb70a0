"""The `import-gguf` verb: a GGUF base model as a Hugging Face folder that train and export take.

edge-lora import-gguf FILE.gguf --out DIR [--dtype f32|f16|bf16] [--force] [--quiet]
"""

from __future__ import annotations

import argparse
import sys
import time


def add_import_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "import-gguf",
        parents=[common],
        help="turn a GGUF base (llama, qwen2) into a Hugging Face model directory",
        description="Dequantize a GGUF base model (Llama 2/3, Mistral, SmolLM, Qwen2) into config.json, "
        "model.safetensors and the tokenizer files, for `edge-lora train` and `edge-lora export`.",
    )
    p.add_argument("gguf", help="the .gguf base model file")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument(
        "--dtype",
        default="f32",
        choices=["f32", "f16", "bf16"],
        help="how the weights are stored (default f32: the dequantized values exactly)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty folder at --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    from converters.gguf_import import import_gguf

    def progress(message: str) -> None:
        print(f"      {message}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    out = import_gguf(
        args.gguf, args.out, dtype=args.dtype, force=args.force, progress=None if args.quiet else progress
    )
    print(f"wrote model folder {out} in {time.perf_counter() - start:.1f}s")
    return 0
