"""The quality rows (benchmarks.quality_bench) end to end on a tiny model, and their perplexity checked
against implementations nobody here wrote: PyTorch's cross-entropy on the very logits each engine
(llama.cpp, ONNX Runtime) returned, and transformers' own fp32 logits. Numbers that depend on random
weights are not asserted; the real model's are (``real``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edge_lora.app import real_text
from edge_lora.errors import EdgeLoraError


@pytest.fixture(scope="module")
def tiny(model_dirs):
    return model_dirs["llama"]


@pytest.fixture(scope="module")
def windows_file(tiny, tmp_path_factory):
    windows = real_text.evaluation_windows(tiny / "tokenizer.json", window=48, max_windows=2)
    path = tmp_path_factory.mktemp("quality") / "windows.json"
    path.write_text(json.dumps(windows))
    return path, windows


def _torch_nll(logits: np.ndarray, ids: list[int]) -> float:
    import torch

    x = torch.from_numpy(np.asarray(logits[: len(ids) - 1], dtype=np.float64))
    return float(torch.nn.functional.cross_entropy(x, torch.tensor(ids[1:]), reduction="sum"))


def test_texts_do_not_overlap():
    evaluation, calibration = real_text.evaluation_text(), real_text.calibration_text()
    assert len(evaluation.split()) > 5000 and len(calibration) > 100_000
    lines = {line.strip() for line in evaluation.splitlines() if len(line.strip()) > 40}
    assert not any(line in calibration for line in lines)


def test_missing_text_is_one_line(tmp_path):
    with pytest.raises(EdgeLoraError) as err:
        real_text.evaluation_text(tmp_path / "nope")
    assert "base-files" in str(err.value.hint) and "\n" not in str(err.value)


@pytest.mark.slow
def test_engine_perplexity_equals_cross_entropy(tiny, windows_file, tmp_path):
    """Each engine's logits -> our NLL equals PyTorch's cross-entropy on the same logits (1e-9), and the
    fp32 files through llama.cpp and ONNX Runtime score as transformers does (1e-4)."""
    from benchmarks import quality_ppl
    from converters.export import ExportOptions, export_bundle

    path, windows = windows_file
    bundle = tmp_path / "bundle"
    options = ExportOptions(onnx_quants=["fp32"], gguf_quants=["f32"], force=True)
    export_bundle(tiny, bundle, [], options, show_progress=False)
    n_ctx = max(len(w) for w in windows)
    specs = {
        "hf": {"path": str(tiny)},
        "gguf": {"path": str(bundle / "gguf" / "model-f32.gguf")},
        "ours-onnx": {"path": str(bundle), "quant": "fp32", "variant": "fast"},
        "ort-folder": {"path": str(bundle / "onnx" / "fp32-fast")},
    }
    totals = {}
    for engine, spec in specs.items():
        logits_of = quality_ppl.ENGINES[engine]({**spec, "n_ctx": n_ctx, "threads": 2})
        nll = 0.0
        for ids in windows:
            logits = logits_of(ids)
            ours = quality_ppl.window_nll(logits, ids)
            assert ours == pytest.approx(_torch_nll(logits, ids), rel=1e-9), engine
            nll += ours
        totals[engine] = nll
    for engine, nll in totals.items():
        assert nll == pytest.approx(totals["hf"], rel=1e-4), engine
    out = quality_ppl.measure({"engine": "gguf", **specs["gguf"], "windows_file": str(path)})
    assert out["tokens"] == sum(len(w) - 1 for w in windows)
    assert out["ppl"] == pytest.approx(math.exp(totals["gguf"] / out["tokens"]), rel=1e-6)


@pytest.mark.slow
def test_quality_rows_end_to_end(tiny, tmp_path):
    """The quick form on the tiny model: every row scored and timed, the table, targets, markdown and
    chart made from them."""
    from benchmarks import charts, quality_bench, quality_targets
    from benchmarks.summary_tables import quality_markdown

    plan = quality_bench.QualityPlan(True, windows=2, window=48, rounds=1, prompt=8, new_tokens=4)
    quality = quality_bench.run(plan, hf_dir=tiny, root=tmp_path / "q", say=lambda _: None)
    labels = {"full precision (transformers fp32)", "edge-lora onnx int4", "edge-lora gguf q4_0"}
    assert set(quality["rows"]) == labels
    for label, row in quality["rows"].items():
        assert "ppl_error" not in row, row.get("ppl_error")
        assert row["ppl"] > 1 and row["file_bytes"] > 0 and len(row["window_nll"]) == 2
        assert len(row["tok_s"]) == 1 and row["tok_s"][0] > 0, label
    table = {r["label"]: r for r in quality_targets.table(quality)}
    assert table["full precision (transformers fp32)"]["ppl_ratio"] == 1.0
    assert table["edge-lora gguf q4_0"]["speed_ratio"] == 1.0
    assert 3.5 < table["edge-lora gguf q4_0"]["bits_per_weight"] < 32
    names = [t["target"] for t in quality_targets.targets(quality)]
    assert "perplexity / full precision (edge-lora onnx int4)" in names
    assert "file size / today's (edge-lora gguf q4_0)" in names
    text = "\n".join(quality_markdown(quality))
    assert text.count("| edge-lora ") >= 2 and "| quality target |" in text
    assert charts.quality_chart(quality, tmp_path / "quality.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.real
def test_real_8bit_within_2_percent(real_model_dir, tmp_path):
    """On the real SmolLM2-135M-Instruct, our int8 ONNX and q8_0 GGUF score within 2% of full precision
    on the GPL-3 text (through ONNX Runtime and llama.cpp)."""
    from benchmarks import quality_bench, quality_targets

    plan = quality_bench.QualityPlan(False, windows=8, rounds=0)
    lists = {"onnx": ["int8"], "portable": [], "gguf": ["q8_0"], "peers": False}
    quality = quality_bench.run(plan, hf_dir=real_model_dir, root=tmp_path, say=print, lists=lists)
    rows = {r["label"]: r for r in quality_targets.table(quality)}
    assert 10 < rows["full precision (transformers fp32)"]["ppl"] < 40
    for label in ("edge-lora onnx int8", "edge-lora gguf q8_0"):
        assert abs(rows[label]["ppl_ratio"] - 1) < 0.02, (label, rows[label])
