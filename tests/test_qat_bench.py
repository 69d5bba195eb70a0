"""benchmarks.qat_bench's report: the target row per backend ((c) within 1 point of (a)), the tables,
and the line --quick prints instead of training the real model four times."""

from __future__ import annotations

from benchmarks import qat_bench


def _accuracy(a: float, b: float, c_gguf: float, c_onnx: float) -> dict:
    return {
        "onnx fp32": {"base": 0.25, "full": a, "peft": a},
        "onnx int4": {"base": 0.26, "full": b, "onnx_int4": c_onnx},
        "llamacpp f32": {"base": 0.25, "full": a, "peft": a},
        "llamacpp q4_0": {"base": 0.24, "full": b, "q4_0": c_gguf},
    }


def test_target_is_within_one_point_of_full_precision():
    rows = {r["target"].split(":")[0]: r for r in qat_bench.targets(_accuracy(0.80, 0.70, 0.795, 0.78))}
    assert rows["llamacpp"]["met"] and round(rows["llamacpp"]["value"], 6) == -0.5
    assert not rows["onnx"]["met"] and round(rows["onnx"]["value"], 6) == -2.0
    assert "(b) full-precision adapter on int4 70.0%" in rows["onnx"]["detail"]


def test_markdown_has_every_engine_target_and_training_row():
    accuracy = _accuracy(0.8, 0.7, 0.8, 0.81)
    training = {
        name: {"wall_s": 100.0, "loop_s": 90.0, "peak_rss_mb": 1500.0, "first_loss": 9.0, "last_loss": 0.3}
        for name in ("edge-lora (--base-quant none)", "transformers + PEFT")
    }
    qat = {
        "task": {"source": "licences", "train": 288, "held_out": 92, "labels": ["Apache"]},
        "hparams": {"rank": 8, "steps": 150, "batch": 8},
        "accuracy": accuracy,
        "targets": qat_bench.targets(accuracy),
        "training": training,
    }
    text = "\n".join(qat_bench.markdown(qat))
    for engine in accuracy:
        assert f"| {engine} |" in text
    assert "| llamacpp q4_0 | 24.0 | 70.0 | 80.0 | n/a | n/a |" in text
    assert text.count("| yes |") == 2
    assert "| transformers + PEFT |" in text and "| 1500 |" in text


def test_quick_run_skips_with_a_reason():
    result = qat_bench.run(quick=True)
    assert result["skipped"].startswith("skipped under --quick")
    assert qat_bench.markdown(result)[2] == result["skipped"]
