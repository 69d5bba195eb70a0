"""Coverage-guided fuzzing (atheris / libFuzzer) of everything that reads bytes from the network.

The first input byte picks the target: the adapter loader (safetensors + metadata + base checks),
bundle.json, a detached signature, or a PEFT adapter_config.json. Any exception other than
EdgeLoraError is a finding; libFuzzer saves the input as crash-* in the working folder.

    pip install atheris                                        # or: pip install -e '.[test]'
    python fuzz/atheris_adapter.py fuzz/corpus -max_total_time=600    # ten minutes
    python fuzz/atheris_adapter.py fuzz/corpus -atheris_runs=200000
    python fuzz/atheris_adapter.py crash-<hash>                        # replay a finding

The corpus folder is seeded with a good adapter, a good bundle.json and a good signature on first use.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import atheris
import numpy as np

with atheris.instrument_imports(include=["edge_lora", "converters.peft"]):
    from converters.peft import export_peft, import_peft
    from edge_lora.adapter import Adapter, LoraWeights
    from edge_lora.bundle import MANIFEST, Bundle, write_manifest
    from edge_lora.config import ModelConfig
    from edge_lora.errors import EdgeLoraError
    from edge_lora.signing import read_signature

BASE = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
)
FINGERPRINT = "sha256:" + "ab" * 32
TARGETS = ("adapter", "bundle", "signature", "peft_config")

WORK = Path(tempfile.mkdtemp(prefix="edge-lora-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)
ADAPTER_PATH = WORK / "a.safetensors"
BUNDLE_ROOT = WORK / "bundle"
SIG_PATH = WORK / "x.sig"
PEFT_DIR = WORK / "peft"


def good_adapter() -> Adapter:
    rng = np.random.default_rng(0)
    module = "model.layers.0.self_attn.q_proj"
    w = LoraWeights(
        a=rng.standard_normal((2, 16)).astype(np.float32),
        b=rng.standard_normal((16, 2)).astype(np.float32),
        alpha=4.0,
    )
    return Adapter(modules={module: w}, base_architecture=BASE.architecture, base_fingerprint=FINGERPRINT)


def seed_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return
    (folder / "peft_config").write_bytes(bytes([3]) + (PEFT_DIR / "adapter_config.json").read_bytes())
    good_adapter().save(ADAPTER_PATH)
    (folder / "adapter").write_bytes(bytes([0]) + ADAPTER_PATH.read_bytes())
    BUNDLE_ROOT.mkdir(exist_ok=True)
    (BUNDLE_ROOT / "tokenizer.json").write_text("{}")
    write_manifest(
        BUNDLE_ROOT,
        {
            "model": BASE.to_dict(),
            "base_fingerprint": FINGERPRINT,
            "tokenizer": {"tokenizer": "tokenizer.json"},
            "backends": {},
            "adapters": {},
            "files": {"tokenizer.json": {"sha256": "0" * 64, "bytes": 2}},
        },
    )
    (folder / "bundle").write_bytes(bytes([1]) + (BUNDLE_ROOT / MANIFEST).read_bytes())
    sig = {
        "format": "edge-lora-signature",
        "version": 1,
        "algorithm": "ed25519",
        "key_id": "0" * 16,
        "sha256": "0" * 64,
        "signature": "A" * 86 + "==",
    }
    (folder / "signature").write_bytes(bytes([2]) + json.dumps(sig).encode())


def one_input(data: bytes) -> None:
    if not data:
        return
    target, body = TARGETS[data[0] % len(TARGETS)], data[1:]
    try:
        if target == "adapter":
            ADAPTER_PATH.write_bytes(body)
            adapter = Adapter.load(ADAPTER_PATH, base=BASE, base_fingerprint=FINGERPRINT)
            for w in adapter.modules.values():  # accepted means usable
                assert np.isfinite(w.a).all() and np.isfinite(w.b).all() and w.a.shape[0] == w.b.shape[1]
        elif target == "bundle":
            BUNDLE_ROOT.mkdir(exist_ok=True)
            (BUNDLE_ROOT / MANIFEST).write_bytes(body)
            bundle = Bundle.open(BUNDLE_ROOT)
            for rel in bundle.files:
                assert bundle.resolve(rel).resolve().is_relative_to(BUNDLE_ROOT.resolve())
        elif target == "signature":
            SIG_PATH.write_bytes(body)
            read_signature(SIG_PATH)
        else:
            (PEFT_DIR / "adapter_config.json").write_bytes(body)
            adapter = import_peft(PEFT_DIR, base=BASE, base_fingerprint=FINGERPRINT)
            for module in adapter.modules:
                assert np.isfinite(adapter.scale(module))
    except EdgeLoraError as err:
        assert "\n" not in str(err)


def main() -> None:
    export_peft(good_adapter(), PEFT_DIR)  # good weights; the fuzzer varies adapter_config.json
    corpus = [a for a in sys.argv[1:] if not a.startswith("-") and not os.path.isfile(a)]
    for folder in corpus:
        seed_corpus(Path(folder))
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
