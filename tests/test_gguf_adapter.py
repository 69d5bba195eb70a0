"""GGUF LoRA export: llama.cpp applies our adapters as our PyTorch model does, and refuses what it cannot."""

from pathlib import Path

import numpy as np
import pytest
import torch
from factories import build_bundle, random_adapter

from edge_lora.adapter import LoraWeights
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.lora_adapter import export_gguf_adapter
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules
from edge_lora.train.lora import load_adapter_into
from edge_lora.train.model import CausalLM


def _gguf_bundle(md, out, adapters=None, adapter_dtype="fp32"):
    return build_bundle(md.path, out, adapters, backends=("gguf",), adapter_dtype=adapter_dtype)


def _strong_adapter(md, seed, mixed=False, **options):
    """Large enough to move the logits; ``mixed``: per-module ranks and alphas (every scaling rule)."""
    order = list(linear_modules(md.config, include_lm_head=True))
    if mixed:
        options.update(mixed_ranks=2, alpha=lambda m: 8.0 + order.index(m) % 2)
    return random_adapter(md, seed, std=0.3, **options)


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
    adapter = _strong_adapter(md, 7, mixed=True, rslora=family in ("qwen2", "smollm"))
    bundle = _gguf_bundle(md, tmp_path / "b", {"a": adapter})
    ids = [int(i) for i in np.random.default_rng(8).integers(0, md.config.vocab_size, 16)]
    ref = _reference(md.path, adapter, ids)
    effect = np.abs(ref - _reference(md.path, None, ids)).max()
    diffs = {}
    for precise in (True, False):
        engine = runtime.load(bundle, backend="llamacpp", precise=precise)
        engine.add_adapter("a")
        diffs[precise] = np.abs(engine.logits(ids, adapters={"a": 1.0}) - ref).max()
    print(
        f"{family}: f32 GGUF + LoRA vs PyTorch max |logit diff| = {diffs[True]:.2e} precise, "
        f"{diffs[False]:.2e} with f16 KV + flash attention (adapter moves logits by {effect:.2f})"
    )
    assert diffs[True] < 1e-2 and diffs[False] < 5e-2 and effect > 0.1


def test_lm_head_lora_on_untied_base(model_dirs, tmp_path):
    import runtime

    md = ModelDir(model_dirs["llama"])
    adapter = _strong_adapter(md, 9, modules=["lm_head", "model.layers.1.self_attn.k_proj"])
    bundle = _gguf_bundle(md, tmp_path / "b", {"head": adapter})
    engine = runtime.load(bundle, backend="llamacpp", precise=True)
    engine.add_adapter("head")
    ids = list(range(3, 15))
    assert np.abs(engine.logits(ids, adapters={"head": 1.0}) - _reference(md.path, adapter, ids)).max() < 1e-2


# q8_0 lora_a also makes llama.cpp quantize the activations it multiplies to 8 bits: looser
@pytest.mark.parametrize("adapter_dtype,dtype,bound", [("fp16", "f16", 0.05), ("int8", "q8_0", 0.25)])
def test_smaller_adapter_dtypes(model_dirs, tmp_path, adapter_dtype, dtype, bound):
    import gguf

    import runtime

    md = ModelDir(model_dirs["llama"])
    adapter = _strong_adapter(md, 10)
    bundle = _gguf_bundle(md, tmp_path / "b", {"a": adapter}, adapter_dtype=adapter_dtype)
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
    tied_head = _strong_adapter(qwen, 1, modules=["lm_head"])
    with pytest.raises(EdgeLoraError, match="tied-embedding.*merge it into the base on the host"):
        export_gguf_adapter(tied_head, qwen.config, tmp_path / "x.gguf")
    dora = _strong_adapter(qwen, 2)
    first = next(iter(dora.modules.values()))
    first.magnitude = np.ones(first.b.shape[0], np.float32)
    with pytest.raises(EdgeLoraError, match="DoRA.*ONNX backend"):
        export_gguf_adapter(dora, qwen.config, tmp_path / "y.gguf")
    llama = ModelDir(model_dirs["llama"])
    with pytest.raises(EdgeLoraError, match="LlamaForCausalLM"):  # adapter for another base
        export_gguf_adapter(_strong_adapter(qwen, 3), llama.config, tmp_path / "z.gguf")
    assert not any(tmp_path.iterdir())


def test_runtime_runs_dora_adapter_file_as_merged_variant(model_dirs, tmp_path):
    import runtime

    md = ModelDir(model_dirs["smollm"])
    bundle = _gguf_bundle(md, tmp_path / "b")
    dora = _strong_adapter(md, 4, modules=["model.layers.0.mlp.up_proj"])
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


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_a_clear_error(model_dirs):
    """gguf-py's writer fails inside write_gguf: one EdgeLoraError naming the file, not an OSError."""
    md = ModelDir(model_dirs["llama"])
    with pytest.raises(EdgeLoraError, match=r"cannot write the GGUF adapter \(No space left") as err:
        export_gguf_adapter(random_adapter(md, seed=1), md.config, Path("/dev/full"), durable=False)
    assert err.value.path == "/dev/full" and "disk space" in err.value.hint
