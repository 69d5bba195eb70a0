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
    # the trainer's --base-quant q4_0 / onnx-int4 quantize through the exporters' own numpy format code
    "train": {"core", "onnx_format", "gguf_format", "train"},
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


def type_only_lines(path: Path) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks: imports for annotations, never run."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    return lines


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports when it runs (lazy imports too, not the type-only ones).
    ``from pkg import mod`` is an edge to ``pkg.mod`` alone: a package whose ``__init__`` loads a module
    importing a sibling that way is no circle."""
    names = {module_name(p) for p in files}
    graph = {}
    for path in files:
        type_only = type_only_lines(path)
        targets = [(line, t) for line, t in imports_of(path) if line not in type_only]
        graph[module_name(path)] = {
            target
            for line, target in targets
            if target in names and not any(at == line and t.startswith(target + ".") for at, t in targets)
        } - {module_name(path)}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other round a circle (Tarjan's strongly connected
    components of more than one module), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def circle_in(graph: dict[str, set[str]], group: list[str]) -> str:
    """A shortest circle from the group's first module back to it (breadth first), to name in a failure."""
    start, inside = group[0], set(group)
    came_from, frontier = {start: None}, [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return " -> ".join([*reversed(path), start])
            if nxt not in came_from:
                came_from[nxt] = node
                frontier.append(nxt)
    raise AssertionError(f"no circle in {group}")


def test_no_import_cycles():
    """No modules of ours import each other round a circle, at module level or lazily: a circle means
    none of them can be read, tested or moved without the others."""
    graph = import_graph(package_files())
    assert [f"{circle_in(graph, g)} (group: {', '.join(g)})" for g in import_cycles(graph)] == []


def test_the_check_catches_a_lazy_import_cycle(tmp_path, monkeypatch):
    fake_root = tmp_path / "repo"
    files = {
        "benchmarks/__init__.py": "",
        "benchmarks/a.py": "from benchmarks.b import f\n",
        "benchmarks/b.py": "def f():\n    from benchmarks import c\n",
        "benchmarks/c.py": "def g():\n    import benchmarks.a\n",
        # type-only imports and a package loading a module that imports a sibling through it: no circle
        "runtime/__init__.py": "def load():\n    from runtime.x import y\n",
        "runtime/x.py": "from runtime import sampling\nif TYPE_CHECKING:\n    from runtime import load\n",
        "runtime/sampling.py": "",
    }
    for name, source in files.items():
        (fake_root / name).parent.mkdir(parents=True, exist_ok=True)
        (fake_root / name).write_text(source)
    monkeypatch.setattr(f"{__name__}.ROOT", fake_root)
    graph = import_graph(sorted(fake_root.rglob("*.py")))
    assert import_cycles(graph) == [["benchmarks.a", "benchmarks.b", "benchmarks.c"]]
    assert circle_in(graph, ["benchmarks.a", "benchmarks.b", "benchmarks.c"]) == (
        "benchmarks.a -> benchmarks.b -> benchmarks.c -> benchmarks.a"
    )
