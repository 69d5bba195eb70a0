"""The bundle writer: a complete, self-describing bundle; no half bundle on failure; --add-adapter."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from factories import adapter_file, build_bundle

from converters.export import AdapterSource, ExportOptions, add_adapter, export_bundle
from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.bundle import Bundle, sha256_file
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir


@pytest.fixture(scope="module")
def bundle(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    a = adapter_file(model_dirs["llama"], root / "a.safetensors", seed=1, alpha=4.0, std=0.3)
    b = adapter_file(model_dirs["llama"], root / "b.safetensors", seed=2, alpha=4.0, std=0.3)
    return build_bundle(model_dirs["llama"], root / "bundle", {"a": a, "b": b}, backends=("onnx", "gguf"))


def test_bundle_is_complete_and_self_describing(bundle, model_dirs):
    b = Bundle.open(bundle)
    md = ModelDir(model_dirs["llama"])
    assert b.base_fingerprint == md.fingerprint
    assert b.config == md.config
    assert [e["model"] for e in b.backends["onnx"]] == ["onnx/fp32-fast/model.onnx"]
    assert [e["model"] for e in b.backends["gguf"]] == ["gguf/model-f32.gguf"]
    assert set(b.adapters) == {"a", "b"}
    for name, entry in b.adapters.items():
        assert entry["source"] == f"adapters/{name}.safetensors"
        assert entry["onnx"] == f"adapters/{name}.onnx_adapter" and entry["gguf"] == f"adapters/{name}.gguf"
        assert entry["rank"] == 4 and entry["sha256"] == sha256_file(bundle / entry["source"])
    on_disk = {
        p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "bundle.json"
    }
    assert on_disk == set(b.files)  # every file is recorded, nothing else lies around
    for rel in b.files:
        b.verify_file(rel)
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".bundle.")]  # no staging left


def test_bundle_runs_without_its_sources(bundle, tmp_path):
    import shutil

    import runtime

    moved = tmp_path / "moved"
    shutil.copytree(bundle, moved)
    engine = runtime.load(moved, backend="onnx")
    engine.add_adapter("a")
    ids = engine.tokenizer.encode("The quick brown fox")
    base, adapted = engine.logits(ids), engine.logits(ids, adapters={"a": 1.0})
    assert np.abs(base - adapted).max() > 1e-2


def test_existing_target_is_refused_then_replaced_with_force(bundle, model_dirs, tmp_path):
    out = tmp_path / "b"
    build_bundle(model_dirs["llama"], out, {}, backends=("gguf",))
    with pytest.raises(EdgeLoraError, match="already a bundle"):
        build_bundle(model_dirs["llama"], out, {}, backends=("gguf",))
    options = ExportOptions(backends=["onnx"], onnx_quants=["fp32"], force=True)
    export_bundle(model_dirs["llama"], out, [], options, show_progress=False)
    assert list(Bundle.open(out).backends) == ["onnx"]
    assert not (out / "gguf").exists()


def test_failed_export_leaves_no_half_bundle(model_dirs, tmp_path, monkeypatch):
    import converters.gguf_export as gguf_export

    def broken(*args, **kwargs):
        raise EdgeLoraError("simulated failure half way")

    monkeypatch.setattr(gguf_export, "export_gguf", broken)
    out = tmp_path / "half"
    with pytest.raises(EdgeLoraError, match="simulated"):
        build_bundle(model_dirs["llama"], out, {}, backends=("onnx", "gguf"))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_next_export_removes_what_a_killed_export_left(model_dirs, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs, as after a SIGKILL
    abandoned = tmp_path / f".b.partial-{dead.pid}-x1y2"
    (abandoned / "onnx").mkdir(parents=True)
    live = tmp_path / f".b.partial-{os.getpid()}-z3w4"  # an export still running in this process
    live.mkdir()
    build_bundle(model_dirs["llama"], tmp_path / "b", {}, backends=("onnx", "gguf"))
    assert not abandoned.exists() and live.exists()
    assert Bundle.open(tmp_path / "b").adapters == {}


def test_adapter_for_another_base_is_refused_before_any_work(model_dirs, tmp_path):
    other = adapter_file(model_dirs["mistral"], tmp_path / "other.safetensors", seed=3, alpha=4.0, std=0.3)
    with pytest.raises(EdgeLoraError, match="wrong base|not a linear|was made for"):
        build_bundle(model_dirs["llama"], tmp_path / "x", {"other": other}, backends=("onnx", "gguf"))
    assert not (tmp_path / "x").exists()


def test_add_adapter_touches_only_the_adapter(bundle, model_dirs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    before = Bundle.open(copy)
    base_files = {k: v for k, v in before.files.items() if not k.startswith("adapters/")}
    mtimes = {k: os.stat(copy / k).st_mtime_ns for k in base_files}
    c = adapter_file(model_dirs["llama"], tmp_path / "c.safetensors", seed=5, rank=2, alpha=2.0, std=0.3)
    entry = add_adapter(copy, AdapterSource(c, "c"), show_progress=False)
    after = Bundle.open(copy)
    assert set(after.adapters) == {"a", "b", "c"} and entry["rank"] == 2
    assert {k: v for k, v in after.files.items() if not k.startswith("adapters/")} == base_files
    assert {k: os.stat(copy / k).st_mtime_ns for k in base_files} == mtimes
    for rel in after.files:
        after.verify_file(rel)
    with pytest.raises(EdgeLoraError, match="already has an adapter"):
        add_adapter(copy, AdapterSource(c, "c"), show_progress=False)
    add_adapter(copy, AdapterSource(tmp_path / "c.safetensors", "c"), replace=True, show_progress=False)


def test_peft_directory_is_imported(bundle, model_dirs, tmp_path):
    import shutil

    from converters.peft import export_peft

    adapter = Adapter.load(
        adapter_file(model_dirs["llama"], tmp_path / "p.safetensors", seed=7, alpha=4.0, std=0.3)
    )
    peft_dir = export_peft(adapter, tmp_path / "peft")
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    add_adapter(copy, AdapterSource.parse(f"{peft_dir}:from_peft"), show_progress=False)
    b = Bundle.open(copy)
    assert b.adapters["from_peft"]["base_fingerprint"] == b.base_fingerprint
    stored = Adapter.load(copy / b.adapters["from_peft"]["source"])
    some = next(iter(adapter.modules))
    np.testing.assert_allclose(stored.delta(some), adapter.delta(some), rtol=1e-6, atol=1e-7)


def test_dora_and_tied_head_get_onnx_files_and_a_merged_gguf_variant(model_dirs, tmp_path, capsys):
    """No GGUF LoRA can express DoRA or a tied head's LoRA: bundle.json says the runtime merges them
    when added."""
    dora = adapter_file(
        model_dirs["llama"], tmp_path / "dora.safetensors", seed=4, dora=True, alpha=4.0, std=0.3
    )
    out = build_bundle(model_dirs["llama"], tmp_path / "b", {"dora": dora}, backends=("onnx", "gguf"))
    entry = Bundle.open(out).adapters["dora"]
    assert (
        entry["onnx"] and "gguf" not in entry and "gguf_skipped" not in entry and "onnx_skipped" not in entry
    )
    assert "merged into a variant" in entry["gguf_merged"] and "DoRA" in entry["gguf_merged"]
    assert "has no gguf file" not in capsys.readouterr().err
    tied = adapter_file(model_dirs["smollm"], tmp_path / "tied.safetensors", seed=4, alpha=4.0, std=0.3)
    md = ModelDir(model_dirs["smollm"])
    adapter = Adapter.load(tied)
    adapter.modules["lm_head"] = LoraWeights(
        a=np.ones((2, md.config.hidden_size), np.float32),
        b=np.ones((md.config.vocab_size, 2), np.float32),
        alpha=2.0,
    )
    adapter.save(tied)
    entry = Bundle.open(
        build_bundle(model_dirs["smollm"], tmp_path / "t", {"tied": tied}, backends=("onnx", "gguf"))
    ).adapters["tied"]
    assert entry["onnx"] and "gguf" not in entry and "tied output head" in entry["gguf_merged"]


def test_adapter_spec_parsing():
    assert AdapterSource.parse("runs/sql.safetensors") == AdapterSource(Path("runs/sql.safetensors"), "sql")
    assert AdapterSource.parse("runs/peft_dir:tone") == AdapterSource(Path("runs/peft_dir"), "tone")
    with pytest.raises(EdgeLoraError, match="bad adapter name"):
        AdapterSource.parse("x.safetensors:../evil")
