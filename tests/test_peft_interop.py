"""PEFT interop against the real peft: same logits both ways, and pickles refused."""

import dataclasses
import json

import pytest
import torch
from factories import build_bundle, random_adapter
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from tiny_models import load_hf

from converters.peft import export_peft, import_peft
from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.train.lora import load_adapter_into
from edge_lora.train.model import CausalLM

# down_proj at another alpha, so alpha_pattern is exercised
SPREAD = {"std": 0.1, "alpha": lambda m: 4.0 if "down" in m else 8.0}


def ours_with(model_dir, adapter):
    model = CausalLM.from_model_dir(model_dir).eval()
    load_adapter_into(model, adapter)
    return model


@pytest.mark.parametrize("rslora,dora", [(False, False), (True, False), (False, True)])
def test_our_adapter_in_peft_gives_our_logits(model_dirs, tmp_path, rslora, dora):
    md = ModelDir(model_dirs["qwen2"])
    adapter = random_adapter(
        md.config, rank=lambda m: 2 if "q_proj" in m else 4, rslora=rslora, dora=dora, **SPREAD
    )
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
    adapter = random_adapter(small, **SPREAD)
    export_peft(adapter, tmp_path)
    wider = dataclasses.replace(small, intermediate_size=small.intermediate_size * 2)
    with pytest.raises(EdgeLoraError, match="wrong base"):
        import_peft(tmp_path, base=wider)


@pytest.fixture()
def lying_peft_dir(model_dirs, tmp_path):
    """A PEFT directory of rank-8 tensors whose adapter_config.json says r=1e9 (alpha / r would scale
    the adapter to nothing)."""
    md = ModelDir(model_dirs["llama"])
    out = export_peft(random_adapter(md.config, rank=8, **SPREAD), tmp_path / "lying")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and not cfg["rank_pattern"]
    cfg["r"] = 1_000_000_000
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


LIE = "adapter_config.json says r=1000000000 but lora_A of model.layers.0.mlp.down_proj has rank 8"


def test_config_rank_that_contradicts_the_tensors_is_refused(lying_peft_dir, model_dirs):
    md = ModelDir(model_dirs["llama"])
    for base in (None, md.config):
        with pytest.raises(EdgeLoraError) as err:
            import_peft(lying_peft_dir, base=base)
        assert LIE in str(err.value) and str(lying_peft_dir / "adapter_config.json") in str(err.value)
        assert "\n" not in str(err.value)


def test_rank_pattern_is_the_rank_it_names(model_dirs, tmp_path):
    """rank_pattern legitimately differs from r (PEFT's per-module ranks); a wrong one is refused too."""
    md = ModelDir(model_dirs["llama"])
    adapter = random_adapter(md.config, rank=lambda m: 2 if m.endswith("q_proj") else 8, **SPREAD)
    out = export_peft(adapter, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and set(cfg["rank_pattern"].values()) == {2}
    imported = import_peft(out, base=md.config)
    assert imported.modules["model.layers.1.self_attn.q_proj"].rank == 2
    assert imported.modules["model.layers.1.self_attn.k_proj"].rank == 8
    cfg["rank_pattern"] = {"q_proj": 16}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeLoraError, match=r"says r=16 \(rank_pattern\) but lora_A of .*q_proj has rank 2"):
        import_peft(out, base=md.config)


def test_cli_refuses_the_lying_config_in_one_line(lying_peft_dir, model_dirs, tmp_path, capsys):
    from edge_lora.app.cli import main

    bundle = build_bundle(model_dirs["llama"], tmp_path / "bundle", backends=("gguf",))
    for argv in (
        ["inspect", str(lying_peft_dir)],
        ["export", "--quiet", "--add-adapter", str(bundle), f"{lying_peft_dir}:lie"],
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and LIE in err and "adapter_config.json:" in err, err
    assert Bundle.open(bundle).adapters == {}  # nothing was added
