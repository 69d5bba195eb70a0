"""`--base-quant q4_0 | q8_0 | onnx-int4`: the trainer's frozen base is, bit for bit, what the exported
files hold. Weights are read back from the FILES the real exporter writes (gguf-py's reader and
decoder; the ONNX initializers and MatMulNBits' dequantization) and compared with np.array_equal;
then an adapter trained against the q4_0 base runs on llama.cpp with the trainer's own logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factories import build_bundle

from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules


def trainer_weights(model_dir, quant: str, importance=None) -> dict[str, np.ndarray]:
    """``{tensor name: dequantized frozen weight}`` of the trainer's base (linears, table, head)."""
    import torch

    from edge_lora.train.quant import QuantEmbedding, QuantLinear
    from edge_lora.train.trainable_model import load_model

    model = load_model(ModelDir(model_dir), quant, importance=importance)
    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                out[f"{name}.weight"] = module.dequantized_weight().numpy()
            elif isinstance(module, QuantEmbedding):
                out["model.embed_tokens.weight"] = module.weight.numpy()
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                out[f"{name}.weight"] = module.weight.numpy()
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def gguf_file_weights(gguf_path, config) -> dict[str, np.ndarray]:
    """The GGUF file's weights decoded by gguf-py, by our tensor name, in checkpoint row order."""
    import gguf

    from edge_lora.gguf_format.names import gguf_tensor, permute_rows, rotary_heads
    from edge_lora.gguf_format.quant import decode

    wanted = {gguf_tensor(f"{m}.weight"): m for m in [*linear_modules(config), "model.embed_tokens"]}
    if not config.tie_word_embeddings:
        wanted["output.weight"] = "lm_head"
    out = {}
    for t in gguf.GGUFReader(gguf_path).tensors:
        if t.name not in wanted:
            continue
        module = wanted[t.name]
        rows = decode(t.data, t.tensor_type, tuple(int(n) for n in reversed(t.shape)))
        heads = rotary_heads(config, module)
        if heads is not None:  # gguf row i holds checkpoint row order[i]
            order = permute_rows(np.arange(rows.shape[0]), heads)
            rows = rows[np.argsort(order)]
        out[f"{module}.weight"] = rows
    return out


def onnx_file_weights(onnx_path, config) -> dict[str, np.ndarray]:
    """The ONNX graph's weights as MatMulNBits reads them, split from their fused groups per module."""
    import onnx
    from onnx import numpy_helper

    from edge_lora.onnx_format.names import lora_groups
    from edge_lora.onnx_format.weight_quant import NBitsWeight, dequantize_nbits

    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    groups = lora_groups(config)
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        arrays = [numpy_helper.to_array(inits[n]) for n in node.input[1:] if n]
        packed, scales = arrays[0], arrays[1]
        zero_points = arrays[2] if len(arrays) > 2 else None
        n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
        packed = packed.reshape(n, -(-k // block), -1)
        weight = dequantize_nbits(NBitsWeight(packed, scales, zero_points, attrs["bits"], block, k))
        group = node.name.rsplit("/", 1)[0]
        if group == "lm_head" and config.tie_word_embeddings:
            out["model.embed_tokens.weight"] = weight  # the table the lookups gather from, too
            continue
        start = 0
        for module, rows, _ in groups[group]:
            out[f"{module}.weight"] = weight[start : start + rows]
            start += rows
    if not config.tie_word_embeddings:
        out["model.embed_tokens.weight"] = numpy_helper.to_array(inits["model.embed_tokens.weight"]).astype(
            np.float32
        )
    return out


@pytest.mark.parametrize("family", ["smollm", "llama"])  # tied (Q8_0 / asymmetric int4 table) and untied
def test_trainer_base_is_the_exported_base_bit_for_bit(model_dirs, tmp_path, family):
    model_dir = model_dirs[family]
    config = ModelDir(model_dir).config
    bundle = build_bundle(
        model_dir,
        tmp_path / "bundle",
        backends=("onnx", "gguf"),
        onnx_quants=("int4",),
        gguf_quants=("q4_0", "q8_0"),
    )
    files = {
        "q4_0": gguf_file_weights(bundle / "gguf/model-q4_0.gguf", config),
        "q8_0": gguf_file_weights(bundle / "gguf/model-q8_0.gguf", config),
        "onnx-int4": onnx_file_weights(bundle / "onnx/int4-fast/model.onnx", config),
    }
    full = trainer_weights(model_dir, "none")
    for quant, device in files.items():
        ours = trainer_weights(model_dir, quant)
        assert sorted(ours) == sorted(device) == sorted(full), quant
        for name, weight in device.items():
            assert ours[name].dtype == np.float32
            assert np.array_equal(ours[name], weight), f"{quant} {name}"
        # and it is a quantized base, not the full-precision one
        assert not np.array_equal(
            ours["model.layers.0.mlp.down_proj.weight"], full["model.layers.0.mlp.down_proj.weight"]
        )


def test_device_base_stays_quantized_in_memory(model_dirs):
    """The linears and the tied table keep their codes (4 bits + scales), not float copies."""
    from edge_lora.train.quant import QuantEmbedding, QuantLinear
    from edge_lora.train.trainable_model import load_model

    md = ModelDir(model_dirs["smollm"])
    for quant, table_bits, has_zeros in (("q4_0", 8, False), ("onnx-int4", 4, True)):
        model = load_model(md, quant)
        linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert len(linears) == len(linear_modules(md.config)) and all(m.bits == 4 for m in linears)
        table = model.model.embed_tokens
        assert isinstance(table, QuantEmbedding) and table.bits == table_bits
        assert (table.zeros is not None) == has_zeros


def test_onnx_int4_refuses_a_tied_table_it_cannot_share(tmp_path):
    from tiny_models import make_model_dir

    from edge_lora.errors import EdgeLoraError
    from edge_lora.train.trainable_model import load_model

    md = ModelDir(make_model_dir(tmp_path / "m", "smollm", hidden_size=48, num_attention_heads=4))
    with pytest.raises(EdgeLoraError, match="multiple of 32"):
        load_model(md, "onnx-int4")


def test_cli_refuses_a_group_size_for_the_export_formats(model_dirs, tmp_path, capsys):
    from edge_lora.train.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the fox"}) + "\n")
    out = tmp_path / "a.safetensors"
    argv = ["--model", str(model_dirs["smollm"]), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--base-quant", "q4_0", "--quant-group-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --quant-group-size applies to int8/int4") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_adapter_trained_on_q4_0_runs_on_llamacpp_as_the_trainer_computes(model_dirs, tmp_path):
    """Train against the q4_0 base, export q4_0 with the adapter: llama.cpp's logits (f32 KV) equal the
    trainer's own forward within llama.cpp's activation rounding, far closer than the full-precision
    forward with the same adapter."""
    import torch
    from tiny_models import quick_train_config

    import runtime
    from edge_lora.adapter import Adapter
    from edge_lora.train.lora import load_adapter_into
    from edge_lora.train.trainable_model import load_model
    from edge_lora.train.trainer import train

    model_dir = model_dirs["smollm"]
    data = tmp_path / "d.jsonl"
    lines = [{"prompt": f"the fox number {i} says", "completion": f" select {i % 3}"} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg = quick_train_config(
        tmp_path, model_dir, data, base_quant="q4_0", compute_dtype="fp32", steps=12, lr=3e-2, eval_split=0
    )
    train(cfg)
    adapter = Adapter.load(cfg.out)
    bundle = build_bundle(
        model_dir, tmp_path / "bundle", {"a": cfg.out}, backends=("gguf",), gguf_quants=("q4_0",)
    )
    engine = runtime.load(bundle, backend="llamacpp", precise=True)
    engine.add_adapter("a")
    ids = engine.tokenizer.encode("the fox number 7 says select 1 and the dog")
    device = engine.logits(ids, adapters={"a": 1.0})

    def forward(quant: str) -> np.ndarray:
        model = load_model(ModelDir(model_dir), quant)
        load_adapter_into(model, adapter)
        with torch.no_grad():
            return model.eval()(torch.tensor([ids]))[0].numpy()

    ours, full = forward("q4_0"), forward("none")
    scale = float(np.std(device))
    ours_err, full_err = np.abs(device - ours).max() / scale, np.abs(device - full).max() / scale
    print(f"max|diff|/std: trainer q4_0 {ours_err:.2e}, trainer full precision {full_err:.2e}")
    # what is left is llama.cpp's own arithmetic: it rounds activations to 8 bits for q4_0/q8_0 dot
    # products (measured 0.021 here, against 0.18 for the full-precision forward)
    assert ours_err < 5e-2
    assert ours_err < full_err / 5
