"""AdamW over the trainable parameters (LoRA+ and weight-decay groups) and its learning-rate
schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from edge_lora.train.config import TrainConfig


def optimizer_groups(params: dict[str, nn.Parameter], cfg: TrainConfig) -> list[dict]:
    groups: dict[tuple, list] = {}
    for name, p in params.items():
        is_b = name.endswith("lora_B")
        scale = cfg.lora_plus_ratio if (is_b and cfg.lora_plus_ratio > 0) else 1.0
        decay = cfg.weight_decay if name.endswith(("lora_A", "lora_B")) else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": decay}
        for (scale, decay), ps in groups.items()
    ]


def build_optimizer(params: dict[str, nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        optimizer_groups(params, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int, total: int) -> None:
    """Each group's rate for ``step``: the schedule's factor times the group's LoRA+ scale."""
    factor = lr_factor(step, total, cfg.warmup_steps, cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group["lr_scale"] * factor
