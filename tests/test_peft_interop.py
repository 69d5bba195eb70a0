"""PEFT interop against the real peft: same logits both ways, and pickles refused."""

import dataclasses

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from tiny_models import load_hf

from converters.peft import export_peft, import_peft
from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules
from edge_lora.train.lora import load_adapter_into
from edge_lora.train.model import CausalLM


def random_adapter(config, rank_of=lambda m: 4, alpha=8.0, rslora=False, dora=False, seed=0) -> Adapter:
    rng = np.random.default_rng(seed)
    modules = {}
    for m, (out_f, in_f) in linear_modules(config).items():
        r = rank_of(m)
        modules[m] = LoraWeights(
            a=rng.normal(0, 0.1, (r, in_f)).astype(np.float32),
            b=rng.normal(0, 0.1, (out_f, r)).astype(np.float32),
            alpha=alpha if "down" not in m else alpha / 2,
            magnitude=rng.uniform(0.5, 1.5, out_f).astype(np.float32) if dora else None,
        )
    return Adapter(modules=modules, base_architecture=config.architecture, rslora=rslora)


def ours_with(model_dir, adapter):
    model = CausalLM.from_model_dir(model_dir).eval()
    load_adapter_into(model, adapter)
    return model


@pytest.mark.parametrize("rslora,dora", [(False, False), (True, False), (False, True)])
def test_our_adapter_in_peft_gives_our_logits(model_dirs, tmp_path, rslora, dora):
    md = ModelDir(model_dirs["qwen2"])
    adapter = random_adapter(md.config, rank_of=lambda m: 2 if "q_proj" in m else 4, rslora=rslora, dora=dora)
    export_peft(adapter, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(load_hf(md.path), tmp_path / "peft").eval()
    ids = torch.randint(0, md.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (ours_with(md.path, adapter)(ids) - peft_model(ids).logits).abs().max().item()
    print(f"ours->peft rslora={rslora} dora={dora}: max |diff| {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "smollm"])
def test_peft_made_adapter_imports_to_same_logits(model_dirs, tmp_path, family):
    md = ModelDir(model_dirs[family])
    cfg = PeftLoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        use_rslora=(family == "llama"),
        use_dora=(family == "mistral"),
        rank_pattern={"q_proj": 2},
        alpha_pattern={"down_proj": 3},
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(load_hf(md.path), cfg)
    with torch.no_grad():  # B starts at zero; give it values so the test means something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    adapter = import_peft(tmp_path / "peft", base=md.config, base_fingerprint=md.fingerprint)
    assert adapter.modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert adapter.modules["model.layers.1.mlp.down_proj"].alpha == 3
    ids = torch.randint(0, md.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (ours_with(md.path, adapter)(ids) - peft_model.eval()(ids).logits).abs().max().item()
    print(f"peft->ours {family}: max |diff| {diff:.2e}")
    assert diff < 1e-4
    # and through our adapter file, with the base fingerprint recorded
    adapter.save(tmp_path / "a.safetensors")
    again = Adapter.load(tmp_path / "a.safetensors", base=md.config, base_fingerprint=md.fingerprint)
    assert again.base_fingerprint == md.fingerprint and again.rslora == adapter.rslora


def test_pickled_only_peft_dir_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not-unpickled")
    with pytest.raises(EdgeLoraError, match="pickled"):
        import_peft(tmp_path)


def test_peft_adapter_for_another_shape_is_refused(model_dirs, tmp_path):
    small = ModelDir(model_dirs["llama"]).config
    adapter = random_adapter(small)
    export_peft(adapter, tmp_path)
    wider = dataclasses.replace(small, intermediate_size=small.intermediate_size * 2)
    with pytest.raises(EdgeLoraError, match="wrong base"):
        import_peft(tmp_path, base=wider)
