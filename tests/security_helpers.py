"""Builders shared by the security tests: valid adapters and hand-made bundles to corrupt.

The bundles here hold what every loader reads (bundle.json, tokenizer, adapter files, hashes) and
no backend model, so they are fast to make and test the core checks without any backend.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.bundle import sha256_file, write_manifest
from edge_lora.config import ModelConfig
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules
from runtime.engine import Engine


def make_adapter(
    config: ModelConfig,
    fingerprint: str | None,
    *,
    rank: int = 4,
    seed: int = 0,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Adapter:
    """A random adapter on ``modules`` of every layer (nonzero B, so it changes the output)."""
    rng = np.random.default_rng(seed)
    shapes = linear_modules(config)
    chosen = {}
    for name, (out_f, in_f) in shapes.items():
        if name.rsplit(".", 1)[-1] in modules:
            chosen[name] = LoraWeights(
                a=(0.1 * rng.standard_normal((rank, in_f))).astype(np.float32),
                b=(0.1 * rng.standard_normal((out_f, rank))).astype(np.float32),
                alpha=2.0 * rank,
            )
    return Adapter(modules=chosen, base_architecture=config.architecture, base_fingerprint=fingerprint)


def make_core_bundle(root: Path, model_dir: Path, adapters: dict[str, Adapter]) -> Path:
    """A bundle with tokenizer and adapter files only (no backend model), bundle.json written last."""
    root = Path(root)
    md = ModelDir(model_dir)
    (root / "adapters").mkdir(parents=True, exist_ok=True)
    shutil.copy(md.tokenizer_path, root / "tokenizer.json")
    files = ["tokenizer.json"]
    entries = {}
    for name, adapter in adapters.items():
        rel = f"adapters/{name}.safetensors"
        adapter.save(root / rel)
        files.append(rel)
        entries[name] = {"source": rel, "scale": 1.0}
    write_manifest(
        root,
        {
            "created_by": "tests",
            "model": md.config.to_dict(),
            "base_fingerprint": md.fingerprint,
            "tokenizer": {"tokenizer": "tokenizer.json"},
            "backends": {},
            "adapters": entries,
            "files": {
                rel: {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
                for rel in files
            },
        },
    )
    return root


class RegistryEngine(Engine):
    """The engine's adapter registry and trust checks, without a model behind it."""

    backend_name = "registry"

    def _attach(self, name, adapter, source):
        return name

    def _new_state(self, adapter_set, loaded):
        raise NotImplementedError("no model in this test engine")

    def _full_logits(self, ids, adapter_set, loaded):
        raise NotImplementedError("no model in this test engine")

    def _merge(self, name, loaded, scale):
        raise NotImplementedError("no model in this test engine")
