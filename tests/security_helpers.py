"""Shared by the security tests: an engine with no model behind it, and the names the corpus and fuzz
tests call (``make_adapter``, ``make_core_bundle``), which build through tests/factories.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from factories import build_bundle, random_adapter

from edge_lora.adapter import Adapter
from edge_lora.config import ModelConfig
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
    return random_adapter(
        config, seed, rank=rank, alpha=2.0 * rank, modules=modules, std=0.1, fingerprint=fingerprint
    )


def make_core_bundle(root: str | os.PathLike, model_dir: Path, adapters: dict[str, Adapter]) -> Path:
    """The smallest bundle the exporter writes (a GGUF f32 base of the tiny model) with ``adapters``."""
    return build_bundle(model_dir, root, adapters, backends=("gguf",))


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
