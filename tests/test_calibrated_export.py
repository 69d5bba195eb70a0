"""Calibrated 4-bit exports (`edge-lora export --calibration`): the importance measured on text weighs
the scale search in both formats, is kept in the bundle, and the trainer's ``--base-importance BUNDLE``
rebuilds the device's weights from it bit for bit (read back from the files the exporter wrote)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import build_bundle
from test_train_device_quant import gguf_file_weights, onnx_file_weights, trainer_weights

from edge_lora.errors import EdgeLoraError
from edge_lora.importance import FILE_NAME, load_base_importance
from edge_lora.model_dir import ModelDir


def _importance(model_dir):
    from edge_lora.train.importance import collect_importance

    md = ModelDir(model_dir)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, md.config.vocab_size, size=(4, 32)).tolist()
    return collect_importance(md, windows, source="random ids")


def test_importance_covers_every_linear(model_dirs):
    imp = _importance(model_dirs["llama"])
    md = ModelDir(model_dirs["llama"])
    assert imp.tokens == 128
    q = imp.for_module("model.layers.0.self_attn.qkv_proj")
    assert q is not None and q.shape == (md.config.hidden_size,) and np.all(q > 0)
    assert imp.for_tensor("model.layers.1.mlp.down_proj.weight").shape == (md.config.intermediate_size,)
    assert imp.for_tensor("lm_head.weight") is not None


@pytest.mark.parametrize("family", ["smollm", "llama"])
def test_trainer_rebuilds_the_calibrated_base_bit_for_bit(model_dirs, tmp_path, family):
    model_dir = model_dirs[family]
    config = ModelDir(model_dir).config
    importance = _importance(model_dir)
    bundle = build_bundle(
        model_dir,
        tmp_path / "bundle",
        backends=("onnx", "gguf"),
        onnx_quants=("int4",),
        gguf_quants=("q4_0",),
        importance=importance,
    )
    entry = json.loads((bundle / "bundle.json").read_text())["calibration"]
    assert entry["file"] == FILE_NAME and entry["sha256"] == importance.digest
    assert FILE_NAME in json.loads((bundle / "bundle.json").read_text())["files"]
    again = load_base_importance(bundle)
    files = {
        "q4_0": gguf_file_weights(bundle / "gguf/model-q4_0.gguf", config),
        "onnx-int4": onnx_file_weights(bundle / "onnx/int4-fast/model.onnx", config),
    }
    for quant, device in files.items():
        ours = trainer_weights(model_dir, quant, again)
        plain = trainer_weights(model_dir, quant, None)
        for name, weight in device.items():
            assert np.array_equal(ours[name], weight), f"{quant} {name}"
        # the calibration changed the weights: without it the trainer would train on another base
        assert not np.array_equal(
            plain["model.layers.0.mlp.down_proj.weight"], ours["model.layers.0.mlp.down_proj.weight"]
        )


def test_bundle_without_calibration_is_named(model_dirs, tmp_path):
    bundle = build_bundle(model_dirs["llama"], tmp_path / "b", backends=("gguf",), gguf_quants=("q4_0",))
    with pytest.raises(EdgeLoraError, match="without calibration"):
        load_base_importance(bundle)


def test_tampered_importance_is_refused(model_dirs, tmp_path):
    bundle = build_bundle(
        model_dirs["llama"],
        tmp_path / "b",
        backends=("gguf",),
        gguf_quants=("q4_0",),
        importance=_importance(model_dirs["llama"]),
    )
    from edge_lora.importance import load_importance

    imp = load_importance(bundle / FILE_NAME)
    name = sorted(imp.vectors)[0]
    imp.vectors[name] = imp.vectors[name] * 2
    imp._digest = ""
    (bundle / FILE_NAME).chmod(0o644)
    imp.save(bundle / FILE_NAME)
    with pytest.raises(EdgeLoraError, match="hash"):
        load_base_importance(bundle)


def test_cli_calibration_from_jsonl_and_none(model_dirs, tmp_path, capsys):
    from edge_lora.app.cli import main

    data = tmp_path / "train.jsonl"
    words = " ".join(f"word{i}" for i in range(400))
    data.write_text(json.dumps({"prompt": "Q: ", "completion": words}) + "\n")
    out = tmp_path / "cal"
    args = [str(model_dirs["llama"]), "--out", str(out), "--backends", "gguf", "--quiet"]
    assert main(["export", *args, "--calibration", str(data)]) == 0
    assert json.loads((out / "bundle.json").read_text())["calibration"]["source"] == "train.jsonl"
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "source: train.jsonl" in capsys.readouterr().out
    plain = tmp_path / "plain"
    assert main(["export", *args[:2], str(plain), *args[3:], "--calibration", "none"]) == 0
    assert "calibration" not in json.loads((plain / "bundle.json").read_text())
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["export", *args[:2], str(tmp_path / "x"), *args[3:], "--calibration", str(bad)]) == 2
    assert not (tmp_path / "x").exists()
