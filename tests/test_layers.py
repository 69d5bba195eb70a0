"""Imports only point down the layers (README, "Layout"): a test that walks every import, lazy ones too.

app          edge_lora/app (CLI verbs, inspect, quickstart), benchmarks: may import anything
converters   host-side export          runtime   on-device, no torch        train   host trainer (torch)
onnx_format  gguf_format               format code shared by converters and runtime
core         the rest of edge_lora/: config, model dir, tensor files, adapter, bundle, signing, errors
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge_lora", "converters", "runtime", "benchmarks")

# most specific prefix first
LAYER_OF = (
    ("edge_lora.app", "app"),
    ("edge_lora.__main__", "app"),
    ("benchmarks", "app"),
    ("edge_lora.train", "train"),
    ("edge_lora.onnx_format", "onnx_format"),
    ("edge_lora.gguf_format", "gguf_format"),
    ("converters", "converters"),
    ("runtime", "runtime"),
    ("edge_lora", "core"),
)
ALL_LAYERS = {layer for _, layer in LAYER_OF}
MAY_IMPORT = {
    "core": {"core"},
    "onnx_format": {"core", "onnx_format"},
    "gguf_format": {"core", "gguf_format"},
    "train": {"core", "train"},
    "converters": {"core", "onnx_format", "gguf_format", "converters"},
    "runtime": {"core", "onnx_format", "gguf_format", "runtime"},
    "app": ALL_LAYERS,
}
# third-party packages a layer must not need: the core installs with numpy, safetensors and tokenizers
# only, and nothing that runs on the device imports torch
HOST_ONLY = {"torch", "transformers", "peft"}
BACKENDS = {"onnx", "onnxruntime", "onnxruntime_genai", "gguf", "llama_cpp", "cryptography"}
MUST_NOT_IMPORT = {
    "core": HOST_ONLY | BACKENDS - {"cryptography"},
    "onnx_format": HOST_ONLY,
    "gguf_format": HOST_ONLY,
    "runtime": HOST_ONLY,
    "converters": HOST_ONLY,
}


def layer_of(module: str) -> str | None:
    for prefix, layer in LAYER_OF:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, anywhere in the file (function-level imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            # ``from edge_lora import signing`` imports the module edge_lora.signing
            found += [
                (node.lineno, f"{base}.{alias.name}")
                for alias in node.names
                if (ROOT / Path(*f"{base}.{alias.name}".split("."))).with_suffix(".py").is_file()
                or (ROOT / Path(*f"{base}.{alias.name}".split("."))).is_dir()
            ]
    return found


def package_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def violations(files: list[Path]) -> list[str]:
    wrong = []
    for path in files:
        layer = layer_of(module_name(path))
        for line, target in imports_of(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            target_layer = layer_of(target)
            if target_layer is not None and target_layer not in MAY_IMPORT[layer]:
                wrong.append(f"{where}: {layer} imports {target} ({target_layer})")
            if target.split(".")[0] in MUST_NOT_IMPORT.get(layer, ()):
                wrong.append(f"{where}: {layer} imports {target}")
    return wrong


def test_every_module_has_a_layer():
    assert all(layer_of(module_name(p)) for p in package_files())


def test_no_import_points_up_a_layer():
    assert violations(package_files()) == []


@pytest.mark.parametrize(
    "source, layer, expected",
    [
        (
            "from runtime.engine import Engine\n",
            "edge_lora/signing.py",
            "core imports runtime.engine (runtime)",
        ),
        (
            "def f():\n    import converters.peft\n",
            "runtime/engine.py",
            "runtime imports converters.peft (converters)",
        ),
        (
            "def f():\n    from edge_lora import app\n",
            "edge_lora/bundle.py",
            "core imports edge_lora.app (app)",
        ),
        ("import torch\n", "runtime/sampling.py", "runtime imports torch"),
        (
            "from ..errors import EdgeLoraError\nfrom .. import app\n",
            "edge_lora/onnx_format/names.py",
            "onnx_format imports edge_lora.app (app)",
        ),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, layer, expected):
    """The walk sees module-level, lazy and relative imports (so the test above can fail)."""
    fake_root = tmp_path / "repo"
    for package in PACKAGES:
        (fake_root / package).mkdir(parents=True)
    (fake_root / "edge_lora" / "app").mkdir()
    (fake_root / "edge_lora" / "onnx_format").mkdir()
    target = fake_root / layer
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    monkeypatch.setattr(f"{__name__}.ROOT", fake_root)
    assert any(expected in line for line in violations([target])), violations([target])
