"""The lane's bundles, built on the x86 host through the real exporter (it needs torch): one tiny model
per family of tests/tiny_models.py with four adapters from tests/factories.py (two plain LoRAs of
different ranks, a DoRA, one that adds tokens), at the quantizations scripts/arm64_cases.py asks for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from arm64_cases import FULL_FAMILIES, NEW_TOKENS, Target  # noqa: E402
from factories import build_bundle, random_adapter  # noqa: E402
from tiny_models import make_model_dir  # noqa: E402

from edge_lora.model_dir import ModelDir  # noqa: E402


def _adapters(md: ModelDir) -> dict:
    # b_std keeps each adapter's effect on the logits near a real one's (a few tenths), so a
    # quantized base's rounding is measured on realistic numbers, not drowned by a huge delta
    tok = random_adapter(md, seed=4, rank=2, b_std=0.05)
    rng = np.random.default_rng(4)
    tok.added_tokens = list(NEW_TOKENS)
    tok.embed_rows = rng.normal(0, 1.0, (len(NEW_TOKENS), md.config.hidden_size)).astype(np.float32)
    if not md.config.tie_word_embeddings:
        tok.head_rows = rng.normal(0, 1.0, (len(NEW_TOKENS), md.config.hidden_size)).astype(np.float32)
    return {
        "a": random_adapter(md, seed=1, rank=4, b_std=0.05),
        "b": random_adapter(md, seed=2, rank=2, b_std=0.05, mixed_ranks=2),
        "dora": random_adapter(md, seed=3, rank=4, b_std=0.05, dora=True),
        "tok": tok,
    }


def build_all(root: Path, chosen: list[Target]) -> None:
    """Model directories under ``root/models``, bundles under ``root/bundles`` (one per family, plus
    ``FAMILY-portable`` for the standard-ops ONNX graph)."""
    for family in sorted({t.family for t in chosen}):
        md = ModelDir(make_model_dir(root / "models" / family, family))
        adapters = _adapters(md)
        mine = [t for t in chosen if t.family == family]
        fast = sorted({t.quant for t in mine if t.backend == "onnx" and t.variant == "fast"})
        gguf = sorted({t.quant for t in mine if t.backend == "llamacpp"})
        build_bundle(
            md.path,
            root / "bundles" / family,
            adapters,
            backends=("onnx", "gguf"),
            onnx_quants=fast,
            gguf_quants=gguf,
        )
        if family in FULL_FAMILIES:
            portable = sorted({t.quant for t in mine if t.variant == "portable"})
            build_bundle(
                md.path,
                root / "bundles" / f"{family}-portable",
                adapters,
                onnx_quants=portable,
                onnx_variant="portable",
            )
