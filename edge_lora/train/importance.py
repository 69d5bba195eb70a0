"""Collect :class:`edge_lora.importance.Importance` from calibration text: one forward pass of the
full-precision model over token windows, the mean squared input of every linear layer per column
(llama.cpp's imatrix; its ``llama-imatrix`` tool does the same with the model's own kernels).

Accumulated in float64 so the result does not depend on how the windows are batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from edge_lora.importance import Importance
from edge_lora.model_dir import ModelDir


@torch.no_grad()
def collect_importance(md: ModelDir, windows: Sequence[Sequence[int]], source: str = "") -> Importance:
    """Mean squared activation entering each ``nn.Linear`` of the model, per input column."""
    from edge_lora.train.trainable_model import load_model

    model = load_model(md).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):  # noqa: ANN202 - a forward hook
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    tokens = 0
    try:
        for window in windows:
            ids = torch.tensor([list(window)], dtype=torch.long)
            model(ids)
            tokens += ids.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    vectors = {name: (sums[name] / counts[name]).to(torch.float32).numpy() for name in sums}
    return Importance({k: np.ascontiguousarray(v) for k, v in vectors.items()}, source=source, tokens=tokens)
