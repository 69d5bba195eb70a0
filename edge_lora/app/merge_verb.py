"""The `merge` verb: a plain HF model with the adapters folded in.

edge-lora merge MODEL_DIR ADAPTER[:SCALE]... --out DIR
"""

from __future__ import annotations

import argparse


def add_merge_arguments(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("merge", parents=[common], help="fold adapters into a Hugging Face model directory")
    p.add_argument("model", help="base model directory")
    p.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER[:SCALE]",
        help="adapter .safetensors or PEFT dir, with an optional scale",
    )
    p.add_argument("--out", required=True, help="new model directory")
    p.set_defaults(func=run_merge)


def adapter_and_scale(spec: str) -> tuple[str, float]:
    """``path[:scale]``; a colon that is not followed by a number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    try:
        return (head, float(tail)) if sep else (spec, 1.0)
    except ValueError:
        return spec, 1.0


def run_merge(args: argparse.Namespace) -> int:
    from converters.merge_model_dir import merge_into_model_dir

    out = merge_into_model_dir(args.model, [adapter_and_scale(spec) for spec in args.adapters], args.out)
    print(f"wrote merged model {out}")
    return 0
