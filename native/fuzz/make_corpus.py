"""Writes the fuzz driver's seed corpus (native/fuzz/corpus/): one byte naming the parser (0 bundle.json,
1 .sig, 2 adapter file), then a real file of that kind from a tiny exported bundle.

    python native/fuzz/make_corpus.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from factories import build_bundle, random_adapter  # noqa: E402
from tiny_models import make_model_dir  # noqa: E402

from edge_lora.model_dir import ModelDir  # noqa: E402
from edge_lora.signing import generate_keypair, sign_bundle  # noqa: E402


def main() -> None:
    out = ROOT / "native" / "fuzz" / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        md = ModelDir(make_model_dir(tmp / "model", "llama", hidden_size=64))
        adapter = random_adapter(md, seed=1, rank=1, modules=["model.layers.0.self_attn.q_proj"])
        adapter.added_tokens = ["<sql>", "</sql>"]
        rows = np.random.default_rng(0).normal(0, 1, (2, md.config.hidden_size))
        adapter.embed_rows = rows.astype(np.float32)
        adapter.head_rows = adapter.embed_rows.copy()
        activated = random_adapter(md, seed=2, rank=1, modules=["model.layers.0.self_attn.v_proj"])
        activated.invocation_tokens = [11, 12, 13]  # aLoRA: its metadata's alora_invocation_tokens
        adapters = {"sql": adapter, "alora": activated}
        bundle = build_bundle(md.path, tmp / "bundle", adapters, backends=("gguf",))
        key, _ = generate_keypair(tmp / "key")
        sign_bundle(bundle, key)
        seeds = {
            "bundle.json": b"\x00" + (bundle / "bundle.json").read_bytes(),
            "bundle.json.sig": b"\x01" + (bundle / "bundle.json.sig").read_bytes(),
            "adapter.safetensors": b"\x02" + (bundle / "adapters" / "sql.safetensors").read_bytes(),
            "adapter_alora.safetensors": b"\x02" + (bundle / "adapters" / "alora.safetensors").read_bytes(),
        }
    for name, data in seeds.items():
        (out / name).write_bytes(data)
        print(f"{out / name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
