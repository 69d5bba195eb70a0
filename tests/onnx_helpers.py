"""Build bundle folders with ONNX files for the ONNX Runtime tests, and the PyTorch references.

The real bundle writer is converters/export.py; this helper calls the same two functions it does
(export_onnx, export_onnx_adapter) and hashes every file, so the runtime tests stand on their own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from converters.onnx_export import export_onnx, export_onnx_adapter
from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.bundle import sha256_file, write_manifest
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules


def random_adapter(
    md: ModelDir,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    modules=None,
    rslora=False,
    dora=False,
    b_std: float = 0.2,
) -> Adapter:
    """Random A and non-zero B on every decoder linear (or ``modules``): large enough to move the logits."""
    rng = np.random.default_rng(seed)
    shapes = linear_modules(md.config, include_lm_head=True)
    weights = {}
    for i, m in enumerate(modules or linear_modules(md.config)):
        out_f, in_f = shapes[m]
        r = rank + (i % 3)  # mixed ranks: stacking must not assume one rank
        mag = rng.uniform(0.5, 1.5, out_f).astype(np.float32) if dora else None
        weights[m] = LoraWeights(
            a=rng.normal(0, 0.2, (r, in_f)).astype(np.float32),
            b=rng.normal(0, b_std, (out_f, r)).astype(np.float32),
            alpha=alpha,
            magnitude=mag,
        )
    return Adapter(
        modules=weights,
        base_architecture=md.config.architecture,
        base_fingerprint=md.fingerprint,
        rslora=rslora,
    )


def build_bundle(
    model_dir: Path, out: Path, exports=(("fp32", "fast"),), adapters: dict[str, Adapter] | None = None
) -> Path:
    """A bundle with one ONNX model per ``(quant, variant)`` and each adapter as .safetensors + .onnx_adapter."""
    md = ModelDir(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(md.path / name, out / name)
    entries = []
    for quant, variant in exports:
        model = export_onnx(md, out / "onnx" / f"{quant}-{variant}", quant, variant)
        entries.append({"quant": quant, "variant": variant, "model": model.relative_to(out).as_posix()})
    adapter_entries = {}
    for name, adapter in (adapters or {}).items():
        src, onnx = f"adapters/{name}.safetensors", f"adapters/{name}.onnx_adapter"
        (out / "adapters").mkdir(exist_ok=True)
        adapter.save(out / src)
        if not adapter.dora:
            export_onnx_adapter(adapter, md.config, out / onnx)
        adapter_entries[name] = {"source": src, "scale": 1.0, **({} if adapter.dora else {"onnx": onnx})}
    files = {
        p.relative_to(out).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "bundle.json"
    }
    write_manifest(
        out,
        {
            "created_by": "tests",
            "model": md.config.to_dict(),
            "base_fingerprint": md.fingerprint,
            "tokenizer": {"tokenizer": "tokenizer.json", "config": "tokenizer_config.json"},
            "backends": {"onnx": entries},
            "adapters": adapter_entries,
            "files": files,
        },
    )
    return out


def torch_logits(model_dir: Path, ids: list[int], adapters: list[tuple[Adapter, float]] = ()) -> np.ndarray:
    """Reference logits ``[T, vocab]`` from our PyTorch model; adapters applied at their scales.

    One adapter at scale 1 goes through the LoRA layers (load_adapter_into); a weighted set is
    merged into the weights, which is what stacking must equal.
    """
    import torch

    from edge_lora.train.lora import load_adapter_into
    from edge_lora.train.model import CausalLM

    model = CausalLM.from_model_dir(model_dir).eval()
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        load_adapter_into(model, adapters[0][0])
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for adapter, scale in adapters:
                for module in adapter.modules:
                    w = params[f"{module}.weight"]
                    w.copy_(torch.from_numpy(adapter.merged_weight(module, w.numpy(), scale)))
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()
