"""A tied base under --base-quant keeps its embedding table quantized: the lookup and the output head
both read it, and the chunked loss over it equals the loss over the same table dequantized."""

from __future__ import annotations

import pytest
import torch

from edge_lora.model_dir import ModelDir
from edge_lora.train.loss import linear_cross_entropy
from edge_lora.train.quant import QuantEmbedding, TiedQuantHead
from edge_lora.train.tokens import add_new_tokens, head_weights
from edge_lora.train.trainable_model import load_model


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_loss_over_the_quantized_table_equals_the_dense_one(bits):
    torch.manual_seed(0)
    table = QuantEmbedding.from_weight(torch.randn(300, 64), bits, 32)
    dense = table.weight
    hidden = torch.randn(37, 64, requires_grad=True)
    extra = torch.randn(3, 64, requires_grad=True)  # new tokens' rows after the vocabulary
    targets = torch.randint(0, 303, (37,))
    grads = []
    for weight, chunk in ((dense, None), (table, 64)):  # 64-row chunks: five slices plus the new rows
        hidden.grad = extra.grad = None
        loss = linear_cross_entropy(hidden, targets, weight, extra, chunk)
        loss.backward()
        grads.append((loss.item(), hidden.grad.clone(), extra.grad.clone()))
    (l0, h0, e0), (l1, h1, e1) = grads
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert torch.allclose(h1, h0, atol=1e-5) and torch.allclose(e1, e0, atol=1e-5)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_tied_base_keeps_its_table_quantized(model_dirs, quant):
    md = ModelDir(model_dirs["qwen2"])  # tied
    model = load_model(md, base_quant=quant)
    table = model.model.embed_tokens
    assert (
        isinstance(table, QuantEmbedding)
        and isinstance(model.lm_head, TiedQuantHead)
        and model.lm_head.table is table
    )
    assert not any(
        p.numel() == table.vocab * table.hidden for p in model.parameters()
    )  # no full-precision copy
    ids = torch.tensor([[1, 5, 9, 200]])
    assert torch.allclose(table(ids), table.weight[ids], atol=1e-6)
    hidden = model.hidden_states(ids)
    assert torch.allclose(model(ids), hidden @ table.weight.t(), atol=1e-4)
    fp32 = load_model(ModelDir(model_dirs["qwen2"]))
    err = (table.weight - fp32.model.embed_tokens.weight).abs().max().item()
    assert 0 < err < (0.02 if quant == "int8" else 0.2)  # really quantized, and close
    add_new_tokens(model, 2)  # new tokens still work on top of it
    weight, extra = head_weights(model)
    assert weight is table and extra.shape == (2, table.hidden)
