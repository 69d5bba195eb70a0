"""The `export` verb: a bundle from a model directory and adapters, or one more adapter for a bundle.

edge-lora export MODEL_DIR --out BUNDLE [--adapter PATH[:NAME]]... [--backends onnx,gguf]
                 [--onnx-quant int4[,int8]] [--gguf-quant q4_0[,q8_0]] [--force]
edge-lora export --add-adapter BUNDLE PATH[:NAME] [--replace]
(both: [--adapter-dtype fp32|fp16|int8])
"""

from __future__ import annotations

import argparse
import sys

from edge_lora.errors import EdgeLoraError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_export_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a bundle: quantized base per backend + separate adapters",
        description="Write a bundle (bundle.json + files) that the runtime loads on the device.",
    )
    p.add_argument(
        "model", nargs="?", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)"
    )
    p.add_argument("--out", help="bundle folder to write")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:NAME]",
        help="an edge-lora adapter .safetensors or a PEFT directory; repeatable",
    )
    p.add_argument("--backends", default="onnx,gguf", help="comma list of onnx, gguf (default both)")
    p.add_argument("--onnx-quant", default="int4", help="comma list of int4, int8, fp16, fp32 (default int4)")
    p.add_argument(
        "--onnx-variant",
        default="fast",
        choices=["fast", "portable"],
        help="fast: contrib ops (CPU/CUDA/WebGPU); portable: standard ops (NNAPI, CoreML, XNNPACK)",
    )
    p.add_argument("--gguf-quant", default="q4_0", help="comma list of q4_0, q8_0, f16, ... (default q4_0)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument(
        "--add-adapter",
        nargs=2,
        metavar=("BUNDLE", "PATH[:NAME]"),
        help="add one adapter to an existing bundle without touching its base",
    )
    p.add_argument(
        "--replace", action="store_true", help="with --add-adapter: replace an adapter of the same name"
    )
    p.add_argument(
        "--adapter-dtype",
        default="fp32",
        choices=["fp32", "fp16", "int8"],
        help="how adapter files store their values (GGUF f32/f16/q8_0; the .onnx_adapter keeps the graph's "
        "input dtype); default fp32",
    )
    p.add_argument(
        "--gguf-merged-variants",
        action="store_true",
        help="an adapter no GGUF LoRA can express (DoRA, LoRA on a tied head) also ships merged into a "
        "copy of each GGUF base, for runtimes that cannot merge at add time (the C library); a base-sized "
        "file each",
    )
    p.add_argument(
        "--calibration",
        default="auto",
        metavar="auto|none|FILE",
        help="text the 4-bit scales are fitted to (edge_lora/app/calibration.py): auto = Python's help "
        "texts when PyTorch is installed; a .jsonl (your training data) or text file; an "
        "importance.safetensors or bundle to reuse; none",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from converters.export import AdapterSource, ExportOptions, add_adapter, export_bundle

    if args.add_adapter:
        if args.model or args.out:
            raise EdgeLoraError(
                "--add-adapter takes BUNDLE and PATH[:NAME] only", hint="drop MODEL_DIR and --out"
            )
        bundle, spec = args.add_adapter
        source = AdapterSource.parse(spec)
        entry = add_adapter(
            bundle,
            source,
            replace=args.replace,
            show_progress=not args.quiet,
            adapter_dtype=args.adapter_dtype,
            gguf_merged_variants=args.gguf_merged_variants,
        )
        where = ", ".join(k for k in ("onnx", "gguf") if k in entry)
        print(f"added adapter {source.name!r} to {bundle} (rank {entry['rank']}; {where or 'source only'})")
        return 0
    if not args.model or not args.out:
        raise EdgeLoraError(
            "export needs MODEL_DIR and --out BUNDLE", hint="edge-lora export MODEL_DIR --out BUNDLE"
        )
    from edge_lora.app.calibration import export_importance

    options = ExportOptions(
        backends=_csv(args.backends),
        onnx_quants=_csv(args.onnx_quant),
        onnx_variant=args.onnx_variant,
        gguf_quants=_csv(args.gguf_quant),
        force=args.force,
        adapter_dtype=args.adapter_dtype,
        gguf_merged_variants=args.gguf_merged_variants,
    )
    options.validate()
    quants = options.onnx_quants * ("onnx" in options.backends) + options.gguf_quants * (
        "gguf" in options.backends
    )
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    options.importance = export_importance(args.calibration, args.model, quants, say=say)
    sources = [AdapterSource.parse(spec) for spec in args.adapter]
    out = export_bundle(args.model, args.out, sources, options, show_progress=not args.quiet)
    print(f"wrote bundle {out}")
    return 0
