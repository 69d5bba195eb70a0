"""The embedding examples run: the IoT service without torch, the C app on the C library (native/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from factories import adapter_file, build_bundle
from gpu_env import child_env
from native_build import build as native_build

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
def native_app(tmp_path_factory):
    """examples/native/chat_adapters built by its build.sh on the C library (skipped, like
    tests/test_native.py, where the library cannot be built)."""
    native_build()  # skips (or fails in CI) with the build's own message
    out = tmp_path_factory.mktemp("native") / "chat_adapters"
    proc = subprocess.run(
        ["sh", str(ROOT / "examples" / "native" / "build.sh"), str(out)],
        capture_output=True,
        text=True,
        env=child_env(PYTHON=sys.executable),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
    return out


def _run_app(app: Path, args: list[str], **env: str):
    return subprocess.run(
        [str(app), *map(str, args)],
        capture_output=True,
        text=True,
        errors="replace",
        env=child_env(**env),
        timeout=120,
    )


def _app_lines(stdout: str) -> dict[str, tuple[str, list[int]]]:
    """LABEL: TEXT [ids: ...] per line, as {label: (text, ids)}."""
    lines = {}
    for line in stdout.split("\n")[:-1]:  # not splitlines: \x0b and the like are text here
        label, rest = line.split(": ", 1)
        text, ids = rest.rsplit(" [ids:", 1)
        assert ids.endswith("]"), line
        lines[label] = (text, [int(t) for t in ids[:-1].split()])
    return lines


def _python_runtime_tokens(engine, sets: dict[str, dict[str, float]], n: int) -> dict[str, list[int]]:
    """The runtime's greedy ids for each set (stopping, like the app, after a token with a newline)."""
    for name in ("sql", "tone"):
        engine.add_adapter(name)
    ids = engine.tokenizer.encode(PROMPT)
    out = {}
    for label, adapters in sets.items():
        out[label] = []
        for token in engine.generate_ids(ids, SamplingParams(max_new_tokens=n), adapters=adapters):
            out[label].append(token)
            if "\n" in engine.tokenizer.decode([token]):
                break
    return out


def test_native_app_swaps_and_stacks_like_the_python_runtime(bundle, native_app):
    """One line per set (base, each adapter, both stacked; tone at the scale its argument names),
    the same greedy ids as the Python runtime's precise mode, and the adapters change the output."""
    n = 10
    proc = _run_app(
        native_app, [bundle, PROMPT, "sql", "tone=0.5"], N_PREDICT=str(n), PRECISE="1", THREADS="2"
    )
    assert proc.returncode == 0, proc.stderr
    lines = _app_lines(proc.stdout)
    sets = {
        "base": {},
        "sql": {"sql": 1.0},
        "tone=0.5": {"tone": 0.5},
        "sql+tone=0.5": {"sql": 1.0, "tone": 0.5},
    }
    assert list(lines) == list(sets)
    engine = runtime.load(bundle, backend="llamacpp", precise=True, device="cpu", threads=2)
    expected = _python_runtime_tokens(engine, sets, n)
    for label, ids in expected.items():
        assert lines[label][1] == ids, label
        assert "\n" not in lines[label][0]
    assert len({tuple(ids) for _, ids in lines.values()}) == 4  # base, sql, tone and the stack all differ
    assert len({text for text, _ in lines.values()}) >= 3


def test_native_app_reports_a_bad_adapter(bundle, native_app):
    """An adapter the bundle lacks: exit 1 with the library's one-line message (the Python runtime's),
    nothing generated; a malformed NAME=SCALE: exit 2."""
    proc = _run_app(native_app, [bundle, PROMPT, "sql", "missing"])
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"{bundle}: bundle has no adapter 'missing' (has: sql, tone)\n"
    proc = _run_app(native_app, [bundle, PROMPT, "sql=strong"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "sql=strong: not NAME or NAME=SCALE (hint: e.g. sql or sql=0.5)\n"
