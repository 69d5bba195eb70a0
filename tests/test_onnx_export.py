"""ONNX export against our PyTorch model: fp32 within 1e-3 for every family and both variants,
with and without an adapter, through the full-sequence path and the KV-cache decode path."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from factories import build_bundle, random_adapter
from onnx_helpers import torch_logits

from converters.onnx_export import PLAIN_MODEL_FILE, export_onnx
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import names
from runtime.onnx.backend import OnnxEngine

TOL = 1e-3


@pytest.mark.parametrize("variant", ["fast", "portable"])
def test_fp32_matches_pytorch(model_dirs, family, variant, tmp_path):
    md = ModelDir(model_dirs[family])
    adapter = random_adapter(md, seed=1, mixed_ranks=1)
    engine = OnnxEngine(build_bundle(md.path, tmp_path / "b", {"a": adapter}, onnx_variant=variant))
    engine.add_adapter("a")
    ids = [
        int(t) for t in np.random.default_rng(0).integers(0, md.config.vocab_size, 40)
    ]  # > Mistral's window
    for chosen, parts in (({}, []), ({"a": 1.0}, [(adapter, 1.0)])):
        want = torch_logits(md.path, ids, parts)
        full = engine.logits(ids, adapters=chosen)
        state = engine._new_state(*engine._request_set(chosen))
        steps = [state.feed(ids[:24])] + [state.feed([t]) for t in ids[24:]]
        full_diff, step_diff = np.abs(full - want).max(), np.abs(np.stack(steps) - want[23:]).max()
        print(f"{family} {variant} adapters={chosen}: full {full_diff:.2e}, decode {step_diff:.2e}")
        assert full_diff < TOL and step_diff < TOL


def test_export_writes_genai_folder(model_dirs, tmp_path):
    md = ModelDir(model_dirs["qwen2"])
    path = export_onnx(md, tmp_path, "int4", "fast")
    assert path == tmp_path / names.MODEL_FILE
    for name in (
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        names.DATA_FILE,
        names.LAYOUT_FILE,
        PLAIN_MODEL_FILE,
    ):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == md.config.num_key_value_heads
    assert (
        config["search"]["past_present_share_buffer"] is True
    )  # GroupQueryAttention writes the cache in place
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    lora_inputs = [i for i in model.graph.input if i.name.endswith(".lora_A.T")]
    assert (
        len(lora_inputs) == 4 * md.config.num_hidden_layers + 1
    )  # qkv, o, gate_up, down; tied lm_head has one too
    assert all(not i.type.tensor_type.shape.dim[1].dim_value for i in lora_inputs)  # symbolic rank
    plain = onnx.load(str(tmp_path / PLAIN_MODEL_FILE), load_external_data=False)
    assert not [n for n in plain.graph.node if "/lora/" in n.name] and len(plain.graph.input) < len(
        model.graph.input
    )


def test_portable_uses_standard_ops_only(model_dirs, tmp_path):
    """Standard ops only, and the base weights really stored at the quant asked for: int8 matrices
    that DequantizeLinear reads, or fp16 matrices (no fp32 copy, nothing dequantized)."""
    for quant in ("int8", "fp16"):
        path = export_onnx(ModelDir(model_dirs["llama"]), tmp_path / quant, quant, "portable")
        graph = onnx.load(str(path), load_external_data=False).graph
        assert {n.domain for n in graph.node} <= {"", "ai.onnx"}, quant
        dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        if quant == "int8":
            int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
            assert int8 and int8 == dequantized, quant
        else:
            matrices = [t for t in graph.initializer if len(t.dims) == 2]
            weights = [t for t in matrices if t.name.endswith((".weight", ".weight_t"))]  # not LoRA, not rope
            stored = Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in weights)
            assert len(weights) >= 10 and stored == {"FLOAT16": len(weights)} and not dequantized, stored


def test_bad_quant_and_variant_are_user_errors(model_dirs, tmp_path):
    md = ModelDir(model_dirs["llama"])
    with pytest.raises(EdgeLoraError, match="int4"):
        export_onnx(md, tmp_path, "q4_0")
    with pytest.raises(EdgeLoraError, match="portable"):
        export_onnx(md, tmp_path, "int4", "mobile")
