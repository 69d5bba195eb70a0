"""What one request on the ONNX engine runs (:class:`RequestChoice`), and what every decode state
needs from the engine (:class:`DecodeSetup`): the parts of the engine share these, not each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.config import ModelConfig
from edge_lora.onnx_format import names


@dataclass
class RequestChoice:
    """What one request runs: a session, the LoRA inputs fixed for the request, and either run
    options with an active ``LoraAdapter`` or ``owner``, which keeps the memory behind ``lora`` alive."""

    session: object
    lora: dict
    run_options: object = None
    owner: object = None

    @property
    def added_rows(self) -> int:
        """How many new-token rows the request feeds (numpy arrays or OrtValues), past the zero row."""
        rows = self.lora.get(names.ADDED_EMBED_ROWS)
        if rows is None:
            return 0
        shape = rows.shape() if callable(rows.shape) else rows.shape
        return int(shape[0]) - 1


@dataclass
class DecodeSetup:
    """The engine's fixed facts a decode state reads: the model, its KV names, the shared attention
    mask, the session set (its value maker and ``logits_to_keep`` values) and the device."""

    config: ModelConfig
    model_path: Path
    max_context: int
    sessions: object  # CpuSessions or PythonSessions
    gpu: object = None  # DeviceTensors on the GPU path

    def __post_init__(self) -> None:
        c = self.config
        self.cache_names = [
            pair
            for i in range(c.num_hidden_layers)
            for pair in (
                (names.past_key(i), names.present_key(i)),
                (names.past_value(i), names.present_value(i)),
            )
        ]
        # attention masks are [1, total] slices of it (read-only)
        self.mask_ones = np.ones((1, self.max_context), np.int64)

    def logits_width(self, choice: RequestChoice) -> int:
        """One logit per base token and per new-token row the request feeds."""
        return self.config.vocab_size + choice.added_rows
