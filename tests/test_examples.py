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
from gpu_env import child_env

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
    env = child_env(PYTHONPATH=str(tmp_path / "no_torch"))
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
        env=child_env(PYTHON=sys.executable),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    return out


def _run_native(binary: Path, args: list[str], env: dict[str, str], timeout: int = 120):
    return subprocess.run(
        [str(binary), *args], capture_output=True, text=True, errors="replace", env=env, timeout=timeout
    )


def _native_lines(stdout: str) -> dict[str, str]:
    return dict(
        line.split(":", 1) for line in stdout.split("\n") if line
    )  # not splitlines: \x0b is text here


def _python_runtime_tokens(engine, n: int) -> dict[str, list[int]]:
    """The runtime's greedy ids for the native program's four sets (stopping, like it, at a newline)."""
    for name in ("sql", "tone"):
        engine.add_adapter(name)
    ids = engine.tokenizer.encode(PROMPT)
    sets = {
        "base": {},
        "adapter1": {"sql": 1.0},
        "adapter2": {"tone": 1.0},
        "stacked": {"sql": 1.0, "tone": 1.0},
    }
    out = {}
    for label, adapters in sets.items():
        out[label] = []
        for token in engine.generate_ids(ids, SamplingParams(max_new_tokens=n), adapters=adapters):
            out[label].append(token)
            if "\n" in engine.tokenizer.decode([token]):
                break
    return out


def _native_args(engine) -> list[str]:
    gguf = engine.bundle.resolve(engine.bundle.backend_entry("gguf")["model"])
    paths = [engine.bundle.resolve(engine.bundle.adapters[a]["gguf"]) for a in ("sql", "tone")]
    return [str(gguf), PROMPT, *map(str, paths)]


def test_native_program_swaps_and_stacks_like_the_python_runtime(bundle, native_binary):
    """On the CPU, stated: even with the software-GPU switches in its environment (as a test run after
    the GPU tests once passed them on), the program takes the CPU unless DEVICE asks, and says so."""
    n = 10
    b = runtime.load(bundle, backend="llamacpp", precise=True, device="cpu")
    env = child_env(gpu=True, N_PREDICT=str(n), GGML_VK_VISIBLE_DEVICES="0")  # lavapipe listed: not taken
    env.pop("DEVICE", None)
    proc = _run_native(native_binary, _native_args(b), env)
    assert proc.returncode == 0, proc.stderr
    lines = _native_lines(proc.stdout)
    assert list(lines) == ["device", "base", "adapter1", "adapter2", "stacked"]
    assert lines["device"].strip() == "cpu (CPU)"
    expected = _python_runtime_tokens(b, n)
    for label, tokens in expected.items():
        assert [int(t) for t in lines[label].split("|")[0].split()] == tokens, label
    assert len({lines[k].split("|")[0] for k in expected}) >= 3


def test_native_program_refuses_an_unknown_device(bundle, native_binary):
    b = runtime.load(bundle, backend="llamacpp", device="cpu")
    proc = _run_native(native_binary, _native_args(b), child_env(DEVICE="npu"), timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "error: DEVICE=npu: unknown device (hint: cpu or gpu)"


def test_native_program_reports_a_bad_adapter(bundle, native_binary, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    gguf = Path(bundle) / "gguf" / "model-f32.gguf"
    proc = subprocess.run(
        [str(native_binary), str(gguf), PROMPT, str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert proc.returncode == 1
    assert "cannot load the LoRA adapter" in proc.stderr
