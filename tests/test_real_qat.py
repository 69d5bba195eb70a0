"""The whole pipeline on the real SmolLM2-135M-Instruct and a real task (edge_lora.app.real_task: which
licence a passage is from): train a small adapter against the q4_0 base (``--base-quant q4_0``),
export both backends at 4 bits, run and score on the device. The adapter must lift held-out accuracy
clearly above the base's on both backends."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.real]


def test_adapter_trained_on_the_q4_0_base_learns_the_real_task(real_model_dir, tmp_path):
    import runtime
    from converters.export import AdapterSource, ExportOptions, export_bundle
    from edge_lora.app.real_task import accuracy, make_task, read_examples
    from edge_lora.train.config import TrainConfig
    from edge_lora.train.trainer import train

    task = make_task(tmp_path / "task")
    out = tmp_path / "licence.safetensors"
    cfg = TrainConfig.from_dict(
        dict(
            model=str(real_model_dir),
            data=str(task.train),
            out=str(out),
            base_quant="q4_0",
            compute_dtype="fp32",
            rank=8,
            alpha=16,
            lr=2e-3,
            steps=150,
            batch_size=8,
            seq_len=128,
            eval_split=0,
            threads=1,  # other jobs share the test machine: one thread does not spin against them
            progress=False,
        )
    )
    train(cfg)
    options = ExportOptions(backends=["onnx", "gguf"], onnx_quants=["int4"], gguf_quants=["q4_0"])
    bundle = export_bundle(
        real_model_dir, tmp_path / "bundle", [AdapterSource(out, "licence")], options, show_progress=False
    )
    held_out = read_examples(task.held_out)
    for backend in ("llamacpp", "onnx"):
        engine = runtime.load(bundle, backend=backend, threads=1)
        engine.add_adapter("licence")
        base = accuracy(engine, held_out, {})
        adapted = accuracy(engine, held_out, {"licence": 1.0})
        print(f"{backend}: base {base:.3f}, adapter {adapted:.3f} on {len(held_out)} held-out passages")
        assert adapted >= base + 0.25 and adapted >= 0.6, backend
