"""The one adapter factory and the one bundle builder of the tests.

Adapters are random LoRA weights built with :class:`edge_lora.adapter.Adapter` and saved with its
safetensors writer; bundles come from the real exporter (``converters.export.export_bundle``), so a
test runs on exactly what users ship. A test that needs a broken bundle edits one of these.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from converters.export import AdapterSource, ExportOptions, export_bundle
from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.config import ModelConfig
from edge_lora.importance import Importance
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules

Base = ModelDir | ModelConfig | str | os.PathLike


def _config_and_fingerprint(base: Base) -> tuple[ModelConfig, str | None]:
    if isinstance(base, ModelConfig):
        return base, None
    md = base if isinstance(base, ModelDir) else ModelDir(base)
    return md.config, md.fingerprint


def _chosen(config: ModelConfig, modules: Iterable[str] | None) -> list[str]:
    """Full module names: every decoder linear by default; full names keep their order (it fixes the
    random draws), a short name ("q_proj") picks that linear in every layer, in the model's order."""
    every = linear_modules(config, include_lm_head=True)
    if modules is None:
        return list(linear_modules(config))
    wanted = list(modules)
    if all(m in every for m in wanted):
        return wanted
    return [m for m in every if m in wanted or m.rsplit(".", 1)[-1] in wanted]


def random_adapter(
    base: Base,
    seed: int = 0,
    *,
    rank: int | Callable[[str], int] = 4,
    alpha: float | Callable[[str], float] = 8.0,
    modules: Iterable[str] | None = None,
    std: float = 0.2,
    b_std: float | None = None,
    mixed_ranks: int = 0,
    dora: bool = False,
    rslora: bool = False,
    fingerprint: str | None = None,
) -> Adapter:
    """Random A and non-zero B (so the adapter visibly moves the logits) on ``modules``.

    ``base``: a model directory (its fingerprint is recorded) or a bare config. ``rank`` / ``alpha``:
    one value or a function of the module name; ``mixed_ranks=k`` adds ``k * (i % 3)`` to the i-th
    module's rank (stacking and grouping must not assume one rank). ``std`` / ``b_std``: the spread of
    A and B (B defaults to A's). DoRA magnitudes are drawn in [0.5, 1.5).
    """
    config, recorded = _config_and_fingerprint(base)
    rng = np.random.default_rng(seed)
    shapes = linear_modules(config, include_lm_head=True)
    weights = {}
    for i, m in enumerate(_chosen(config, modules)):
        out_f, in_f = shapes[m]
        r = (rank(m) if callable(rank) else rank) + mixed_ranks * (i % 3)
        a = rng.normal(0, std, (r, in_f)).astype(np.float32)
        b = rng.normal(0, std if b_std is None else b_std, (out_f, r)).astype(np.float32)
        magnitude = rng.uniform(0.5, 1.5, out_f).astype(np.float32) if dora else None
        weights[m] = LoraWeights(
            a=a, b=b, alpha=float(alpha(m) if callable(alpha) else alpha), magnitude=magnitude
        )
    return Adapter(
        modules=weights,
        base_architecture=config.architecture,
        base_fingerprint=fingerprint or recorded,
        rslora=rslora,
    )


def adapter_file(base: Base, path: str | os.PathLike, seed: int = 0, **options) -> Path:
    """:func:`random_adapter` saved as our .safetensors adapter file at ``path``."""
    path = Path(path)
    random_adapter(base, seed, **options).save(path)
    return path


def build_bundle(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    adapters: dict[str, Adapter | str | os.PathLike] | None = None,
    *,
    backends: Iterable[str] = ("onnx",),
    onnx_quants: Iterable[str] = ("fp32",),
    onnx_variant: str = "fast",
    gguf_quants: Iterable[str] = ("f32",),
    adapter_dtype: str = "fp32",
    force: bool = False,
    importance: Importance | None = None,
) -> Path:
    """A bundle written by the exporter; ``adapters`` maps bundle names to adapters or their files."""
    options = ExportOptions(
        backends=list(backends),
        onnx_quants=list(onnx_quants),
        onnx_variant=onnx_variant,
        gguf_quants=list(gguf_quants),
        adapter_dtype=adapter_dtype,
        force=force,
        importance=importance,
    )
    with tempfile.TemporaryDirectory(prefix="adapters-") as scratch:
        sources = []
        for name, adapter in (adapters or {}).items():
            path = adapter
            if isinstance(adapter, Adapter):
                path = Path(scratch) / f"{name}.safetensors"
                adapter.save(path)
            sources.append(AdapterSource(Path(path), name))
        return export_bundle(model_dir, out, sources, options, show_progress=False)
