"""LoRA layers: exact trainable-parameter counts, merge/unmerge, and equality with transformers + PEFT."""

import pytest
import torch
from tiny_models import load_hf

from edge_lora.train.lora import (
    LoraConfig,
    apply_lora,
    lora_layers,
    merge_all,
    trainable_parameters,
    unmerge_all,
)
from edge_lora.train.model import CausalLM

# tiny models: hidden 64, intermediate 96, 2 layers, 4 heads x 16, 2 KV heads
# per layer, r * (in + out): q 128, k 96, v 96, o 128, gate 160, up 160, down 160  (sum 928)
R = 4


@pytest.mark.parametrize(
    "targets, rslora, dora, expected",
    [
        ("all-linear", False, False, 2 * R * 928),
        ("attention", False, False, 2 * R * (128 + 96 + 96 + 128)),
        (["q_proj", "v_proj"], False, False, 2 * R * (128 + 96)),
        (r"model\.layers\.1\.mlp\..*", False, False, R * 3 * 160),
        ("all-linear", True, False, 2 * R * 928),
        (
            "all-linear",
            False,
            True,
            2 * R * 928 + 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64),
        ),  # + DoRA magnitudes [out]
    ],
)
def test_exact_trainable_parameter_counts(model_dirs, targets, rslora, dora, expected):
    model = CausalLM.from_model_dir(model_dirs["llama"])
    apply_lora(model, LoraConfig(rank=R, alpha=8, targets=targets, rslora=rslora, dora=dora))
    assert trainable_parameters(model) == expected
    layer = next(iter(lora_layers(model).values()))
    assert layer.scaling == pytest.approx(8 / (R**0.5 if rslora else R))


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude.shape, generator=g))


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge(model_dirs, dora):
    model = CausalLM.from_model_dir(model_dirs["qwen2"]).eval()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(rank=R, alpha=8, dora=dora))
    _randomize(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(ids)
        merge_all(model)
        merged = model(ids)
        unmerge_all(model)
        after = model(ids)
    assert (before - merged).abs().max() < 1e-4
    assert torch.equal(before, after)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base.weight, base_weights[f"{name}.weight"])


@pytest.mark.parametrize("dora, rslora", [(False, False), (False, True), (True, False)])
def test_matches_transformers_plus_peft(model_dirs, dora, rslora):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = CausalLM.from_model_dir(model_dirs["llama3"]).eval()
    apply_lora(ours, LoraConfig(rank=R, alpha=8, targets="all-linear", dora=dora, rslora=rslora))
    _randomize(ours)
    ref = get_peft_model(
        load_hf(model_dirs["llama3"]),
        PeftConfig(
            r=R, lora_alpha=8, target_modules=names, use_dora=dora, use_rslora=rslora, lora_dropout=0.0
        ),
    ).eval()
    with torch.no_grad():
        peft_modules = dict(ref.named_modules())
        for name, layer in lora_layers(ours).items():
            m = peft_modules[f"base_model.model.{name}"]
            m.lora_A["default"].weight.copy_(layer.lora_A)
            m.lora_B["default"].weight.copy_(layer.lora_B)
            if dora:
                m.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
        ids = torch.randint(0, ours.config.vocab_size, (2, 20))
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
