"""Build a bundle folder with GGUF files for the llama.cpp tests (the real bundle writer lives elsewhere)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from converters.gguf_export import export_gguf
from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.bundle import sha256_file, write_manifest
from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules


def random_adapter(
    md: ModelDir, seed: int, rank: int = 4, alpha: float = 8.0, modules=None, rslora=False, mixed_ranks=False
) -> Adapter:
    """Random A and non-zero B on every decoder linear (or ``modules``), large enough to move the logits."""
    rng = np.random.default_rng(seed)
    shapes = linear_modules(md.config, include_lm_head=True)
    chosen = modules or list(linear_modules(md.config))
    weights = {}
    for i, m in enumerate(chosen):
        out_f, in_f = shapes[m]
        r = rank + (i % 3) * 2 if mixed_ranks else rank
        weights[m] = LoraWeights(
            a=rng.normal(0, 0.3, (r, in_f)).astype(np.float32),
            b=rng.normal(0, 0.3, (out_f, r)).astype(np.float32),
            alpha=alpha + (i % 2 if mixed_ranks else 0),
        )
    return Adapter(
        modules=weights,
        base_architecture=md.config.architecture,
        base_fingerprint=md.fingerprint,
        rslora=rslora,
    )


def build_bundle(
    model_dir: Path,
    out: Path,
    quants=("f32",),
    adapters: dict[str, Adapter] | None = None,
    adapter_dtype: str = "f32",
) -> Path:
    md = ModelDir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    rels = []
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(md.path / name, out / name)
        rels.append(name)
    gguf_entries = []
    for q in quants:
        rel = f"gguf/model-{q}.gguf"
        export_gguf(md, out / rel, q)
        gguf_entries.append({"quant": q, "model": rel})
        rels.append(rel)
    adapter_entries = {}
    for name, adapter in (adapters or {}).items():
        src, gg = f"adapters/{name}.safetensors", f"adapters/{name}.gguf"
        (out / "adapters").mkdir(exist_ok=True)
        adapter.save(out / src)
        export_gguf_adapter(adapter, md.config, out / gg, adapter_dtype)
        adapter_entries[name] = {"source": src, "gguf": gg, "scale": 1.0}
        rels += [src, gg]
    files = {r: {"sha256": sha256_file(out / r), "bytes": (out / r).stat().st_size} for r in rels}
    write_manifest(
        out,
        {
            "created_by": "tests",
            "model": md.config.to_dict(),
            "base_fingerprint": md.fingerprint,
            "tokenizer": {"tokenizer": "tokenizer.json", "config": "tokenizer_config.json"},
            "backends": {"gguf": gguf_entries},
            "adapters": adapter_entries,
            "files": files,
        },
    )
    return out
