"""Packing keeps examples apart: a packed batch trains exactly as its examples run one by one."""

from __future__ import annotations

import pytest
import torch

from edge_lora.model_dir import ModelDir
from edge_lora.train.data import Formatter, build_examples, collate
from edge_lora.train.lora import LoraConfig, apply_lora
from edge_lora.train.trainable_model import TrainModule, load_model

RECORDS = [
    {"text": "the quick brown fox jumps over the lazy dog " * 3},
    {"prompt": "SELECT name FROM users", "completion": " WHERE id = 42;"},
    {"text": "def add(a, b):\n    return a + b\n"},
    {"text": "short one"},
    {"prompt": "Grüße aus Köln!", "completion": " 東京 に 行きます 🙂"},
    {"text": "edge-lora trains adapters on the host " * 2},
]


def trainable_module(model_dir) -> TrainModule:
    torch.manual_seed(0)
    model = load_model(ModelDir(model_dir))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():  # B starts at zero, which would leave A's gradient zero: make both count
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return TrainModule(model).train()


def loss_and_grads(module: TrainModule, batches) -> tuple[float, dict[str, torch.Tensor]]:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    total = 0.0
    for examples in batches:
        ids, targets, segments = collate(examples)
        loss = module(ids, targets, segments)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in params.items()}


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2"]
)  # mistral: a 16-token sliding window inside packed rows
def test_packed_batch_equals_examples_one_by_one(model_dirs, family):
    formatter = Formatter(model_dirs[family])
    single, _ = build_examples(RECORDS, formatter, seq_len=64)
    packed, _ = build_examples(RECORDS, formatter, seq_len=64, packing=True)
    assert (
        len(packed) < len(single) and max(len(e.ids) for e in single) > 16
    )  # rows really hold several examples
    assert sum(e.targets for e in packed) == sum(e.targets for e in single)
    module = trainable_module(model_dirs[family])
    loss_one, grads_one = loss_and_grads(module, [[e] for e in single])
    loss_packed, grads_packed = loss_and_grads(module, [packed])  # every row in one padded batch
    assert loss_packed == pytest.approx(loss_one, rel=1e-5)
    for name, grad in grads_one.items():
        assert torch.allclose(grads_packed[name], grad, rtol=1e-4, atol=1e-6), name


def test_without_segments_attention_would_cross_examples(model_dirs):
    """The check above has teeth: the same rows without their segments give another loss."""
    formatter = Formatter(model_dirs["llama"])
    packed, _ = build_examples(RECORDS, formatter, seq_len=64, packing=True)
    module = trainable_module(model_dirs["llama"])
    ids, targets, segments = collate(packed)
    with torch.no_grad():
        assert abs(module(ids, targets, segments).item() - module(ids, targets).item()) > 1e-3
