"""The benchmark models: random weights with real shapes, one bundle each, cached between runs.

Nothing is downloaded. Each shape (SmolLM2-135M, Qwen2.5-0.5B, see ``benchmarks.gguf_bench.SHAPES``)
becomes, under the cache folder (``$EDGE_LORA_BENCH_DIR`` or ``<tmp>/edge_lora_bench``, never git):

    <shape>/hf/            the Hugging Face directory (fp16 safetensors + byte-level BPE tokenizer)
    <shape>/adapters/      rank-16 all-linear adapters "a", "b" (our .safetensors) and "a" as a PEFT dir
    <shape>/bundle/        `edge-lora export` of it: ONNX int4 (+int8) and GGUF q4_0 (+q8_0), adapters a, b

A folder is rebuilt when its recipe (``RECIPE``) changes; a finished build leaves a stamp file, so an
interrupted one is redone rather than half used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.gguf_bench import SHAPES, make_random_model, random_adapter

RECIPE = 1  # bump when what is built changes
RANK = 16
ADAPTERS = {"a": 1, "b": 2}  # name -> seed


def cache_root() -> Path:
    return Path(os.environ.get("EDGE_LORA_BENCH_DIR", Path(tempfile.gettempdir()) / "edge_lora_bench"))


@dataclass
class BenchModel:
    """Paths of one cached benchmark model."""

    shape: str
    root: Path

    @property
    def hf_dir(self) -> Path:
        return self.root / "hf"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    def adapter_file(self, name: str) -> Path:
        return self.root / "adapters" / f"{name}.safetensors"

    def peft_dir(self, name: str) -> Path:
        return self.root / "adapters" / f"{name}-peft"

    def gguf(self, quant: str) -> Path:
        return self.bundle / "gguf" / f"model-{quant}.gguf"

    def onnx_folder(self, quant: str) -> Path:
        return self.bundle / "onnx" / f"{quant}-fast"

    def gguf_adapter(self, name: str) -> Path:
        return self.bundle / "adapters" / f"{name}.gguf"

    def onnx_adapter(self, name: str) -> Path:
        return self.bundle / "adapters" / f"{name}.onnx_adapter"


def _stamp(folder: Path) -> Path:
    return folder / ".bench-built.json"


def _fresh(folder: Path, recipe: dict) -> bool:
    try:
        return json.loads(_stamp(folder).read_text()) == recipe
    except (OSError, ValueError):
        return False


def _build_into(folder: Path, recipe: dict, build) -> None:
    """Build in a private sibling, stamp it, then swap it in: two runs sharing the cache never see a half
    folder."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    _stamp(tmp).write_text(json.dumps(recipe))
    old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def prepare(shape: str, quants: dict[str, list[str]], say=print) -> BenchModel:
    """Build (or reuse) the model, adapters and bundle of ``shape`` with ``quants`` per backend."""
    from converters.export import AdapterSource, ExportOptions, export_bundle
    from converters.peft import export_peft
    from edge_lora.model_dir import ModelDir

    model = BenchModel(shape, cache_root() / shape)
    recipe = {"recipe": RECIPE, "shape": shape}
    if not _fresh(model.hf_dir, recipe):
        say(f"[models] {shape}: writing a random Hugging Face model")
        _build_into(model.hf_dir, recipe, lambda tmp: make_random_model(SHAPES[shape], tmp))
    md = ModelDir(model.hf_dir)
    adapters_dir = model.root / "adapters"
    if not _fresh(adapters_dir, recipe):
        say(f"[models] {shape}: writing rank-{RANK} adapters")

        def write_adapters(tmp: Path) -> None:
            for name, seed in ADAPTERS.items():
                adapter = random_adapter(md, seed, RANK)
                adapter.save(tmp / f"{name}.safetensors")
                export_peft(adapter, tmp / f"{name}-peft", base_model_name_or_path=str(model.hf_dir))

        _build_into(adapters_dir, recipe, write_adapters)
    bundle_recipe = {**recipe, "quants": quants, "exporters": exporters_digest()}
    if not _fresh(model.bundle, bundle_recipe):
        say(f"[models] {shape}: exporting the bundle {quants}")
        options = ExportOptions(
            backends=["onnx", "gguf"], onnx_quants=quants["onnx"], gguf_quants=quants["gguf"], force=True
        )
        export_bundle(
            model.hf_dir,
            model.bundle,
            [AdapterSource(model.adapter_file(n), n) for n in ADAPTERS],
            options,
            show_progress=False,
        )
        _stamp(model.bundle).write_text(json.dumps(bundle_recipe))
    return model


def exporters_digest() -> str:
    """A digest of the exporter sources: a bundle cached by an older exporter is rebuilt."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    files = sorted(
        [
            *root.glob("converters/*.py"),
            *root.glob("edge_lora/onnx_format/*.py"),
            *root.glob("edge_lora/gguf_format/*.py"),
            root / "edge_lora/safetensors_file.py",
            root / "edge_lora/adapter.py",
        ]
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def extra_adapter(model: BenchModel, name: str, rank: int, seed: int) -> Path:
    """A further random all-linear adapter (scaling runs), as our .safetensors, cached."""
    from edge_lora.model_dir import ModelDir

    path = model.root / "scaling" / f"{name}-r{rank}-s{seed}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        random_adapter(ModelDir(model.hf_dir), seed, rank).save(path)
    return path
