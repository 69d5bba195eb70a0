"""GGUF LoRA export: llama.cpp applies our adapters as our PyTorch model does, and refuses what it cannot."""

import numpy as np
import pytest
import torch
from gguf_helpers import build_bundle, random_adapter

from edge_lora.adapter import LoraWeights
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
from edge_lora.model_dir import ModelDir
from edge_lora.train.lora import load_adapter_into
from edge_lora.train.model import CausalLM


def _reference(model_dir, adapter, ids):
    model = CausalLM.from_model_dir(model_dir).eval()
    if adapter is not None:
        load_adapter_into(model, adapter)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def test_adapter_logits_match_pytorch(model_dirs, family, tmp_path):
    import runtime

    md = ModelDir(model_dirs[family])
    # per-module ranks and alphas, rsLoRA on the tied families: every scaling rule at once
    adapter = random_adapter(md, seed=7, rank=4, mixed_ranks=True, rslora=family in ("qwen2", "smollm"))
    bundle = build_bundle(md.path, tmp_path / "b", adapters={"a": adapter})
    ids = [int(i) for i in np.random.default_rng(8).integers(0, md.config.vocab_size, 16)]
    ref = _reference(md.path, adapter, ids)
    effect = np.abs(ref - _reference(md.path, None, ids)).max()
    diffs = {}
    for precise in (True, False):
        engine = runtime.load(bundle, backend="llamacpp", precise=precise)
        engine.add_adapter("a")
        diffs[precise] = np.abs(engine.logits(ids, adapters={"a": 1.0}) - ref).max()
    print(
        f"{family}: f32 GGUF + LoRA vs PyTorch max |logit diff| = {diffs[True]:.2e} precise, {diffs[False]:.2e} with "
        f"f16 KV + flash attention (adapter moves logits by {effect:.2f})"
    )
    assert diffs[True] < 1e-2 and diffs[False] < 5e-2 and effect > 0.1


def test_lm_head_lora_on_untied_base(model_dirs, tmp_path):
    import runtime

    md = ModelDir(model_dirs["llama"])
    adapter = random_adapter(md, seed=9, modules=["lm_head", "model.layers.1.self_attn.k_proj"])
    bundle = build_bundle(md.path, tmp_path / "b", adapters={"head": adapter})
    engine = runtime.load(bundle, backend="llamacpp", precise=True)
    engine.add_adapter("head")
    ids = list(range(3, 15))
    assert np.abs(engine.logits(ids, adapters={"head": 1.0}) - _reference(md.path, adapter, ids)).max() < 1e-2


# q8_0 lora_a also makes llama.cpp quantize the activations it multiplies to 8 bits: looser
@pytest.mark.parametrize("dtype,bound", [("f16", 0.05), ("q8_0", 0.25)])
def test_smaller_adapter_dtypes(model_dirs, tmp_path, dtype, bound):
    import gguf

    import runtime

    md = ModelDir(model_dirs["llama"])
    adapter = random_adapter(md, seed=10, rank=4)
    bundle = build_bundle(md.path, tmp_path / "b", adapters={"a": adapter}, adapter_dtype=dtype)
    reader = gguf.GGUFReader(bundle / "adapters/a.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight.lora_a"] == dtype.upper()  # 64 inputs: whole q8_0 blocks
    assert types["blk.0.attn_q.weight.lora_b"] == "F16"  # rank 4 rows cannot be q8_0
    assert reader.fields["adapter.lora.alpha"].types[0] == gguf.GGUFValueType.FLOAT32
    assert reader.fields["general.type"].contents() == "adapter"
    engine = runtime.load(bundle, backend="llamacpp")
    engine.add_adapter("a")
    ids = list(range(3, 15))
    diff = np.abs(engine.logits(ids, adapters={"a": 1.0}) - _reference(md.path, adapter, ids)).max()
    print(f"{dtype} adapter: max |logit diff| vs PyTorch = {diff:.3f}")
    assert diff < bound


def test_refuses_what_llama_cpp_cannot_apply(model_dirs, tmp_path):
    qwen = ModelDir(model_dirs["qwen2"])
    tied_head = random_adapter(qwen, seed=1, modules=["lm_head"])
    with pytest.raises(EdgeLoraError, match="tied-embedding.*merge it into the base on the host"):
        export_gguf_adapter(tied_head, qwen.config, tmp_path / "x.gguf")
    dora = random_adapter(qwen, seed=2)
    first = next(iter(dora.modules.values()))
    first.magnitude = np.ones(first.b.shape[0], np.float32)
    with pytest.raises(EdgeLoraError, match="DoRA.*ONNX backend"):
        export_gguf_adapter(dora, qwen.config, tmp_path / "y.gguf")
    llama = ModelDir(model_dirs["llama"])
    with pytest.raises(EdgeLoraError, match="LlamaForCausalLM"):  # adapter for another base
        export_gguf_adapter(random_adapter(qwen, seed=3), llama.config, tmp_path / "z.gguf")
    assert not any(tmp_path.iterdir())


def test_runtime_runs_dora_adapter_file_as_merged_variant(model_dirs, tmp_path):
    import runtime

    md = ModelDir(model_dirs["smollm"])
    bundle = build_bundle(md.path, tmp_path / "b")
    dora = random_adapter(md, seed=4, modules=["model.layers.0.mlp.up_proj"])
    w = dora.modules["model.layers.0.mlp.up_proj"]
    dora.modules["model.layers.0.mlp.up_proj"] = LoraWeights(
        w.a, w.b, w.alpha, magnitude=np.full(w.b.shape[0], 0.7, np.float32)
    )
    dora.save(tmp_path / "dora.safetensors")
    engine = runtime.load(bundle, backend="llamacpp", precise=True)
    engine.add_adapter("d", tmp_path / "dora.safetensors")
    assert "DoRA" in engine.info()["merged_variants"]["d"]["reason"]
    ids = [1, 5, 9, 2]
    assert np.abs(engine.logits(ids, adapters={"d": 1.0}) - _reference(md.path, dora, ids)).max() < 1e-3
    with pytest.raises(EdgeLoraError, match="merged variant.*scale 1.0"):
        engine.logits(ids, adapters={"d": 0.5})
    engine.remove_adapter("d")
    assert engine.adapters == [] and engine.info()["merged_variants"] == {}
