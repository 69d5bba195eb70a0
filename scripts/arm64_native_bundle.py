"""The bundle the C library's test program runs on under QEMU (scripts/arm64-native.sh), exported on the
x86 host through the real exporter (it needs torch; a bundle is the same on every architecture): the
tiny Llama of tests/tiny_models.py with the adapters tests/test_native.py gives its C test program ("a":
rank 4; "b": rank 8, rsLoRA; "x": activated, aLoRA, invoked by ids 11 12 13), GGUF f32.

Usage: python scripts/arm64_native_bundle.py OUT   (prints OUT/bundle; reused when already there)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from factories import build_bundle, random_adapter  # noqa: E402
from tiny_models import make_model_dir  # noqa: E402

from edge_lora.model_dir import ModelDir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the model and the bundle")
    out = parser.parse_args().out
    bundle = out / "bundle"
    manifest = bundle / "bundle.json"
    if not manifest.is_file() or "x" not in json.loads(manifest.read_text())["adapters"]:
        md = ModelDir(make_model_dir(out / "model", "llama"))
        activated = random_adapter(md, seed=11, std=0.2)
        activated.invocation_tokens = [11, 12, 13]
        adapters = {
            "a": random_adapter(md, seed=1, std=0.3),
            "b": random_adapter(md, seed=2, rank=8, rslora=True, std=0.3),
            "x": activated,
        }
        build_bundle(md.path, bundle, adapters, backends=("gguf",), gguf_quants=("f32",), force=True)
    print(bundle)


if __name__ == "__main__":
    main()
