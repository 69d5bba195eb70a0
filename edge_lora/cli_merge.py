"""The `inspect` and `merge` verbs.

    edge-lora inspect PATH [--base BUNDLE|MODEL_DIR] [--json]
    edge-lora merge MODEL_DIR ADAPTER[:SCALE]... --out DIR    (a plain HF model with the adapters folded in)

The merged directory is an ordinary model: export it for a zero-overhead single-task bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import EdgeLoraError


def add_inspect_arguments(sub, common) -> None:
    p = sub.add_parser("inspect", parents=[common], help="what a bundle, adapter, PEFT dir, model dir or GGUF is and what base it fits")
    p.add_argument("path")
    p.add_argument("--base", help="a bundle or model directory: say whether the adapter fits it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_inspect)


def run_inspect(args) -> int:
    from .inspect import describe, format_text

    info = describe(args.path, args.base)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0 if info.get("fits", True) else 3


def add_merge_arguments(sub, common) -> None:
    p = sub.add_parser("merge", parents=[common], help="fold adapters into a Hugging Face model directory")
    p.add_argument("model", help="base model directory")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER[:SCALE]", help="adapter .safetensors or PEFT dir, with an optional scale")
    p.add_argument("--out", required=True, help="new model directory")
    p.set_defaults(func=run_merge)


def merge_into_model_dir(model_dir, adapters: list[tuple[str, float]], out) -> Path:
    """Write ``out`` = the base with each (adapter path, scale) folded in, as float32 safetensors."""
    from converters.export import load_adapter

    from .atomic import atomic_write_bytes, atomic_write_text
    from .model_dir import ModelDir
    from .safetensors_io import save_tensors

    md = ModelDir(model_dir)
    out = Path(out)
    if out.resolve() == md.path.resolve():
        raise EdgeLoraError("--out must differ from the base model directory", path=out)
    loaded = [(load_adapter(path, md.config, md.fingerprint), scale, path) for path, scale in adapters]
    for adapter, _, path in loaded:
        if adapter.token_rows:
            raise EdgeLoraError("adapters with new tokens or token rows cannot be merged into a plain model",
                                path=path,
                                hint="export a bundle with the adapter instead")
    tensors = {name: md.get(name) for name in md.tensor_names()}
    for adapter, scale, _ in loaded:
        for module in adapter.modules:
            key = f"{module}.weight"
            if key not in tensors:
                raise EdgeLoraError(f"the base has no weight {key!r} to merge into", path=md.path)
            tensors[key] = adapter.merged_weight(module, tensors[key], scale)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", tensors, {"format": "pt"})
    raw = json.loads((md.path / "config.json").read_text(encoding="utf-8"))
    raw.pop("torch_dtype", None)
    raw.pop("dtype", None)
    atomic_write_text(out / "config.json", json.dumps(raw, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (md.path / name).is_file():
            atomic_write_bytes(out / name, (md.path / name).read_bytes())  # a kill never leaves a torn copy
    return out


def run_merge(args) -> int:
    specs = []
    for spec in args.adapters:
        head, sep, tail = spec.rpartition(":")
        try:
            specs.append((head, float(tail)) if sep else (spec, 1.0))
        except ValueError:
            specs.append((spec, 1.0))
    out = merge_into_model_dir(args.model, specs, args.out)
    print(f"wrote merged model {out}")
    return 0
