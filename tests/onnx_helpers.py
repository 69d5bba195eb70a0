"""PyTorch reference logits for the ONNX Runtime tests (adapters and bundles come from tests/factories.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter


def torch_logits(model_dir: Path, ids: list[int], adapters: list[tuple[Adapter, float]] = ()) -> np.ndarray:
    """Reference logits ``[T, vocab]`` from our PyTorch model; adapters applied at their scales.

    One adapter at scale 1 goes through the LoRA layers (load_adapter_into); a weighted set is
    merged into the weights, which is what stacking must equal.
    """
    import torch

    from edge_lora.train.lora import load_adapter_into
    from edge_lora.train.model import CausalLM

    model = CausalLM.from_model_dir(model_dir).eval()
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        load_adapter_into(model, adapters[0][0])
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for adapter, scale in adapters:
                for module in adapter.modules:
                    w = params[f"{module}.weight"]
                    w.copy_(torch.from_numpy(adapter.merged_weight(module, w.numpy(), scale)))
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()
