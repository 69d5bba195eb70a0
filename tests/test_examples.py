"""The embedding examples run: the IoT service without torch, the C program through llama.cpp's C API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from factories import adapter_file, build_bundle

import runtime
from runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown"


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    adapters = {
        n: adapter_file(model_dirs["llama"], root / f"{n}.safetensors", seed=s, alpha=4.0, std=0.3)
        for n, s in (("sql", 31), ("tone", 32))
    }
    return build_bundle(model_dirs["llama"], root / "bundle", adapters, backends=("onnx", "gguf"))


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_iot_service_switches_adapters_per_request_without_torch(bundle, backend, tmp_path):
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not installed on this board')\n")
    requests = [{"prompt": PROMPT, "adapter": a, "max_new_tokens": 8} for a in ("sql", None, "tone", "sql")]
    requests.append({"prompt": PROMPT, "adapter": "missing"})
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no_torch")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "iot_device.py"), str(bundle), "--backend", backend],
        input="\n".join(json.dumps(r) for r in requests),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    engine = runtime.load(bundle, backend=backend)
    for name in ("sql", "tone"):
        engine.add_adapter(name)
    for request, reply in zip(requests[:4], replies):
        adapter = request["adapter"]
        expected = engine.generate(
            PROMPT, max_new_tokens=8, adapters={adapter: 1.0} if adapter else {}, stop=["\n"]
        )
        assert reply["text"] == expected and reply["adapter"] == adapter
    assert len({r["text"] for r in replies[:3]}) == 3  # base, sql and tone really differ
    assert "no adapter 'missing'" in replies[4]["error"]


@pytest.fixture(scope="module")
def native_binary(tmp_path_factory):
    if not shutil.which(os.environ.get("CC", "cc")):
        pytest.skip("no C compiler")
    out = tmp_path_factory.mktemp("native") / "lora_swap"
    proc = subprocess.run(
        ["sh", str(ROOT / "examples" / "native" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    return out


def test_native_program_swaps_and_stacks_like_the_python_runtime(bundle, native_binary):
    n = 10
    b = runtime.load(bundle, backend="llamacpp", precise=True)
    gguf = b.bundle.resolve(b.bundle.backend_entry("gguf")["model"])
    paths = [b.bundle.resolve(b.bundle.adapters[a]["gguf"]) for a in ("sql", "tone")]
    proc = subprocess.run(
        [str(native_binary), str(gguf), PROMPT, *map(str, paths)],
        capture_output=True,
        text=True,
        errors="replace",
        env={**os.environ, "N_PREDICT": str(n)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(
        line.split(":", 1) for line in proc.stdout.split("\n") if line
    )  # not splitlines: \x0b is text here
    assert list(lines) == ["base", "adapter1", "adapter2", "stacked"]
    for name in ("sql", "tone"):
        b.add_adapter(name)
    ids = b.tokenizer.encode(PROMPT)
    sets = {
        "base": {},
        "adapter1": {"sql": 1.0},
        "adapter2": {"tone": 1.0},
        "stacked": {"sql": 1.0, "tone": 1.0},
    }
    for label, adapters in sets.items():
        expected = []
        for token in b.generate_ids(ids, SamplingParams(max_new_tokens=n), adapters=adapters):
            expected.append(token)
            if "\n" in b.tokenizer.decode([token]):
                break
        got = [int(t) for t in lines[label].split("|")[0].split()]
        assert got == expected, label
    assert len({lines[k].split("|")[0] for k in sets}) >= 3


def test_native_program_reports_a_bad_adapter(bundle, native_binary, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    gguf = Path(bundle) / "gguf" / "model-f32.gguf"
    proc = subprocess.run(
        [str(native_binary), str(gguf), PROMPT, str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "cannot load the LoRA adapter" in proc.stderr
