"""The CLI verbs over the API, on both backends, and their one-line errors."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from factories import adapter_file
from gpu_env import child_env

from edge_lora.app.cli import main


@pytest.fixture(scope="module")
def files(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = model_dirs["llama"]
    a = adapter_file(model, root / "a.safetensors", seed=21, alpha=4.0, std=0.3)
    b = adapter_file(model, root / "b.safetensors", seed=22, alpha=4.0, std=0.3)
    bundle = root / "bundle"
    assert (
        main(
            [
                "export",
                str(model),
                "--out",
                str(bundle),
                "--adapter",
                f"{a}:sql",
                "--backends",
                "onnx,gguf",
                "--onnx-quant",
                "fp32",
                "--gguf-quant",
                "f32",
                "--quiet",
            ]
        )
        == 0
    )
    return {"model": model, "a": a, "b": b, "bundle": bundle, "root": root}


def run_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_run_matches_the_api(files, capsys, backend):
    import runtime

    argv = [
        "run",
        str(files["bundle"]),
        "--backend",
        backend,
        "--prompt",
        "The quick",
        "--max-new-tokens",
        "8",
        "--json",
    ]
    base = run_json(capsys, argv)
    adapted = run_json(capsys, argv + ["--adapter", "sql:0.7"])
    engine = runtime.load(files["bundle"], backend=backend)
    engine.add_adapter("sql")
    assert base["text"] == engine.generate("The quick", max_new_tokens=8, adapters={})
    assert adapted["text"] == engine.generate("The quick", max_new_tokens=8, adapters={"sql": 0.7})
    assert adapted["adapters"] == {"sql": 0.7} and adapted["backend"] == engine.backend_name
    assert base["text"] != adapted["text"]


def test_run_reads_stdin_and_streams(files, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("The quick"))
    assert main(["run", str(files["bundle"]), "--backend", "onnx", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    out = run_json(
        capsys,
        [
            "run",
            str(files["bundle"]),
            "--backend",
            "onnx",
            "--prompt",
            "The quick",
            "--max-new-tokens",
            "6",
            "--json",
        ],
    )
    assert streamed == out["text"] + "\n"


def test_adapter_file_outside_the_bundle(files, capsys):
    out = run_json(
        capsys,
        [
            "run",
            str(files["bundle"]),
            "--backend",
            "onnx",
            "--prompt",
            "The quick",
            "--max-new-tokens",
            "6",
            "--json",
            "--adapter",
            str(files["b"]),
        ],
    )
    assert out["adapters"] == {"b": 1.0}


def test_chat_switches_adapters_mid_conversation(files, capsys, monkeypatch):
    import runtime

    script = "The quick\n/adapter sql\nThe quick\n/base\n/reset\nThe quick\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert (
        main(["chat", str(files["bundle"]), "--backend", "llamacpp", "--max-new-tokens", "5", "--no-history"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    replies = [
        ln for ln in lines if not ln.startswith(("edge-lora chat", "commands:", "adapters:", "history"))
    ]
    engine = runtime.load(files["bundle"], backend="llamacpp")
    engine.add_adapter("sql")
    expected_base = engine.generate("The quick", max_new_tokens=5, stop=["\n"], adapters={})
    expected_sql = engine.generate("The quick", max_new_tokens=5, stop=["\n"], adapters={"sql": 1.0})
    assert replies == [expected_base, expected_sql, expected_base]
    assert "adapters: {'sql': 1.0}" in lines


def test_export_add_adapter_and_inspect(files, capsys, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(files["bundle"], copy)
    assert main(["export", "--add-adapter", str(copy), f"{files['b']}:tone", "--quiet"]) == 0
    info = run_json(capsys, ["inspect", str(copy), "--json"])
    assert info["kind"] == "bundle" and set(info["adapters"]) == {"sql", "tone"}
    assert {e["quant"] for e in info["backends"]["onnx"]} == {"fp32"}
    adapter = run_json(capsys, ["inspect", str(files["a"]), "--base", str(copy), "--json"])
    assert adapter["kind"] == "adapter" and adapter["fits"] is True and adapter["ranks"] == [4]
    gguf = run_json(capsys, ["inspect", str(copy / "adapters" / "tone.gguf"), "--json"])
    assert gguf["kind"] == "gguf-adapter" and gguf["architecture"] == "llama"
    model = run_json(capsys, ["inspect", str(files["model"]), "--json"])
    assert model["kind"] == "model" and model["base_fingerprint"] == info["base_fingerprint"]


def test_inspect_says_when_an_adapter_does_not_fit(files, model_dirs, capsys):
    assert main(["inspect", str(files["a"]), "--base", str(model_dirs["mistral"])]) == 3
    assert "fits: False" in capsys.readouterr().out


def test_merge_writes_a_model_with_the_adapter_folded_in(files, tmp_path, capsys):
    import runtime

    out = tmp_path / "merged"
    assert main(["merge", str(files["model"]), f"{files['a']}:0.5", "--out", str(out)]) == 0
    merged_bundle = tmp_path / "mb"
    assert (
        main(
            [
                "export",
                str(out),
                "--out",
                str(merged_bundle),
                "--backends",
                "onnx",
                "--onnx-quant",
                "fp32",
                "--quiet",
            ]
        )
        == 0
    )
    ids = [5, 6, 7, 8]
    engine = runtime.load(files["bundle"], backend="onnx")
    engine.add_adapter("sql")
    expected = engine.logits(ids, adapters={"sql": 0.5})
    got = runtime.load(merged_bundle, backend="onnx").logits(ids)
    assert np.abs(expected - got).max() < 1e-4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "/nonexistent/bundle", "--prompt", "x"], "not a bundle directory"),
        (["export", "/nonexistent/model", "--out", "/tmp/x-edge-lora-never"], "not a model directory"),
        (["inspect", "/nonexistent"], "not found"),
    ],
)
def test_errors_are_one_line_with_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_unknown_adapter_and_verbose_traceback(files, capsys):
    argv = ["run", str(files["bundle"]), "--backend", "onnx", "--prompt", "x", "--adapter", "nope"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bundle has no adapter 'nope'" in err and "Traceback" not in err
    assert main(argv + ["--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


VERBS = (
    "train",
    "export",
    "import-gguf",
    "combine",
    "run",
    "chat",
    "inspect",
    "merge",
    "bench",
    "quickstart",
    "keygen",
    "sign",
    "verify",
)


def test_console_entry_point_runs_as_a_module():
    """``python -m edge_lora --help`` lists exactly the verbs (the first word of each listed line, not a
    word found anywhere in the help: "run" is also in "run the benchmarks")."""
    proc = subprocess.run(
        [sys.executable, "-m", "edge_lora", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert proc.returncode == 0
    listed = re.findall(r"^ {4}([a-z][a-z-]*)(?: {2,}|$)", proc.stdout, flags=re.MULTILINE)
    assert sorted(listed) == sorted(VERBS)


def test_runtime_verbs_do_not_import_torch(files):
    code = (
        "import sys; from edge_lora.app.cli import main; "
        f"rc = main(['run', {str(files['bundle'])!r}, '--backend', 'onnx', '--prompt', 'x', "
        "'--max-new-tokens', '2']); "
        "assert rc == 0 and 'torch' not in sys.modules and 'converters' not in sys.modules, "
        "sorted(sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=child_env()
    )
    assert proc.returncode == 0, proc.stderr


def test_train_verb_then_export_the_result(model_dirs, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"prompt": f"SELECT {i}", "completion": f" FROM t{i};"}) for i in range(16))
        + "\n"
    )
    adapter = tmp_path / "sql.safetensors"
    assert (
        main(
            [
                "train",
                "--model",
                str(model_dirs["llama"]),
                "--data",
                str(data),
                "--out",
                str(adapter),
                "--steps",
                "3",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--eval-split",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    info = run_json(capsys, ["inspect", str(adapter), "--base", str(model_dirs["llama"]), "--json"])
    assert info["fits"] is True
    assert (
        main(
            [
                "export",
                str(model_dirs["llama"]),
                "--out",
                str(tmp_path / "b"),
                "--adapter",
                str(adapter),
                "--backends",
                "gguf",
                "--gguf-quant",
                "q8_0",
                "--quiet",
            ]
        )
        == 0
    )
    assert run_json(capsys, ["inspect", str(tmp_path / "b"), "--json"])["adapters"]["sql"]["backends"] == [
        "gguf"
    ]


def test_train_forwards_its_own_flags_and_help(capsys):
    assert main(["train", "--help"]) == 0
    assert "--model" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--model",
                "/nonexistent",
                "--data",
                "/nonexistent.jsonl",
                "--out",
                "/tmp/x.safetensors",
            ]
        )
        != 0
    )
    err = capsys.readouterr().err
    assert "error: /nonexistent: not a model directory" in err and err.count("\n") == 1
