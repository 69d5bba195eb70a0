"""LoRA layers: wrap chosen ``nn.Linear`` modules, merge/unmerge, and move to/from the adapter file.

``y = W x + b + s * B(A(dropout(x)))`` with ``s = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
DoRA rescales each output row of the adapted weight to a learned magnitude ``m``:
``y = m / ||W + s B A||_row * (W + s B A) x + b``.
Initialisation follows PEFT: A Kaiming-uniform, B zeros, so a fresh adapter changes nothing.

Activated LoRA (aLoRA, PEFT's ``alora_invocation_tokens``): the low-rank path is added only at the
positions from the start of the last occurrence of the invocation tokens on (:class:`Activation`,
shared by the model and its LoRA layers); before it the model is the base, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_lora.adapter import Adapter, LoraWeights
from edge_lora.errors import EdgeLoraError
from edge_lora.targets import select_targets

T = TypeVar("T")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    rslora: bool = False
    dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name regex/suffix -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    invocation_tokens: list[int] = field(default_factory=list)  # aLoRA; empty = active everywhere

    def rank_for(self, module: str) -> int:
        return _pattern_value(self.rank_pattern, module, self.rank)

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.alpha))


def _pattern_value(patterns: dict[str, T], module: str, default: T) -> T:
    import re

    for key, value in patterns.items():  # PEFT semantics: suffix or regex match on the module name
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


def activation_mask(
    input_ids: torch.Tensor, invocation: Sequence[int], segments: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, T]`` bool: where an activated adapter acts. PEFT's rule (``calculate_alora_offsets``):
    position ``t`` of a row is active when it is at or after the start of the last occurrence of
    ``invocation`` in the row; a row without one is not active anywhere. PEFT counts the offset back
    from the row's end, which is the same index, with left or right padding alike.

    Packed rows (``segments``, see ``data.pack``): the rule holds per segment, as if each example were
    its own row; an occurrence must lie inside one segment, and padding (segment -1) has none."""
    b, t = input_ids.shape
    n = len(invocation)
    pos = torch.arange(t, device=input_ids.device)
    if n == 0 or t < n:
        return torch.zeros((b, t), dtype=torch.bool, device=input_ids.device)
    tokens = torch.as_tensor(list(invocation), dtype=input_ids.dtype, device=input_ids.device)
    found = (input_ids.unfold(1, n, 1) == tokens).all(-1)  # [B, T - n + 1]: an occurrence starts here
    if segments is not None:
        first, last = segments[:, : t - n + 1], segments[:, n - 1 :]
        found &= (first == last) & (first >= 0)  # segments are contiguous: both ends in one = inside it
    starts = torch.full((b, t), -1, dtype=torch.long, device=input_ids.device)
    starts[:, : t - n + 1] = torch.where(found, pos[: t - n + 1], -1)
    if segments is None:
        begin = starts.amax(1, keepdim=True)
    else:  # the last start of each segment, spread back over its positions (padding: its own bucket)
        seg = torch.where(segments < 0, t, segments).long()
        buckets = torch.full((b, t + 1), -1, dtype=torch.long, device=input_ids.device)
        begin = buckets.scatter_reduce(1, seg, starts, "amax").gather(1, seg)
    return (begin >= 0) & (pos >= begin)


class Activation:
    """The invocation tokens of an activated adapter and the positions of the batch now in the model
    that it acts on, shared by the model (``CausalLM.alora``, which sets them from the input ids each
    forward) and its LoRA layers (which read them)."""

    def __init__(self, invocation_tokens: Sequence[int]):
        if not invocation_tokens:
            raise EdgeLoraError("an activated adapter (aLoRA) needs at least one invocation token")
        self.tokens = [int(i) for i in invocation_tokens]
        # (shape [B, T], flat indices of the active positions): one host sync per forward, not per layer
        self.current: tuple[tuple[int, int], torch.Tensor] | None = None

    def select(
        self, input_ids: torch.Tensor, segments: torch.Tensor | None = None
    ) -> tuple[tuple[int, int], torch.Tensor]:
        """Compute the batch's active positions and make them current; returns them (a checkpointed
        layer makes them current again when it is recomputed)."""
        mask = activation_mask(input_ids, self.tokens, segments)
        self.current = (tuple(mask.shape), mask.reshape(-1).nonzero().squeeze(1))
        return self.current

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.current is None or tuple(x.shape[:-1]) != self.current[0]:
            raise EdgeLoraError(
                "an activated LoRA layer ran without its batch's positions",
                hint="call the model (CausalLM.forward or hidden_states) with the ids, not the layer alone",
            )
        return self.current[1]


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
    ):
        super().__init__()
        if rank <= 0:
            raise EdgeLoraError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_magnitude = nn.Parameter(self._base_weight().norm(dim=1).detach().clone()) if dora else None
        self.merged = False
        self.activation: Activation | None = None  # aLoRA: set by apply_lora / load_adapter_into

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _base_weight(self) -> torch.Tensor:
        """The frozen weight as float (a quantized base dequantizes here)."""
        w = self.base.weight
        return w if w.is_floating_point() else self.base.dequantized_weight()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.activation is not None:
            return self._activated_forward(x)
        if self.lora_magnitude is None:
            # one addmm adds the scaled low-rank path onto the base output: no full-size multiply by
            # the scale and no separate add, forward or backward (the scale lands on [N, r] tensors)
            base = self.base(x)
            xa = F.linear(self.dropout(x), self.lora_A)
            out = torch.addmm(
                base.reshape(-1, base.shape[-1]),
                xa.reshape(-1, self.rank),
                self.lora_B.t(),
                alpha=self.scaling,
            )
            return out.view(base.shape)
        # DoRA as in PEFT: the norm is treated as a constant for the gradient (detach)
        weight = self._base_weight()
        adapted = weight + self.delta_weight()
        norm = adapted.norm(dim=1).detach()
        ratio = (self.lora_magnitude / norm).to(x.dtype)
        x_d = self.dropout(x)
        base_out = F.linear(x_d, weight)
        lora_out = self.scaling * F.linear(F.linear(x_d, self.lora_A), self.lora_B)
        out = (ratio - 1) * base_out + ratio * lora_out
        return self.base(x) + out

    def _activated_forward(self, x: torch.Tensor) -> torch.Tensor:
        """aLoRA as PEFT's ``ALoraLinearVariant``: the low-rank path computed on, and added at, the
        active positions only; elsewhere the output is the base's, bit for bit."""
        rows = self.activation.rows(x)
        base = self.base(x)
        picked = x.reshape(-1, x.shape[-1]).index_select(0, rows)
        delta = F.linear(F.linear(self.dropout(picked), self.lora_A), self.lora_B)
        flat = base.reshape(-1, base.shape[-1])
        return flat.index_add(0, rows, delta.to(flat.dtype), alpha=self.scaling).view(base.shape)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.activation is not None:
            raise EdgeLoraError(
                "an activated adapter (aLoRA) cannot be merged: it acts only after its invocation tokens"
            )
        if not self.base.weight.is_floating_point():
            raise EdgeLoraError("cannot merge into a quantized training base; merge at export instead")
        self._orig = self.base.weight.detach().clone()
        weight = self._orig + self.delta_weight()
        if self.lora_magnitude is not None:
            weight = self.lora_magnitude[:, None] / weight.norm(dim=1, keepdim=True) * weight
        self.base.weight.copy_(weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.copy_(self._orig)
            del self._orig
            self.merged = False


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name), child


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Freeze the model and wrap the targeted linear layers; returns the wrapped module names."""
    if config.invocation_tokens and config.dora:
        raise EdgeLoraError(
            "an activated adapter (aLoRA) cannot be DoRA (PEFT has no such variant either)",
            hint="drop --dora or --alora-invocation",
        )
    for p in model.parameters():
        p.requires_grad_(False)
    names = select_targets(model.config, config.targets)
    if "lm_head" in names and model.config.tie_word_embeddings:
        raise EdgeLoraError(
            "LoRA on lm_head of a tied-embedding model is not supported", hint="target the decoder layers"
        )
    for name in names:
        parent, child = _parent(model, name)
        base = getattr(parent, child)
        setattr(
            parent,
            child,
            LoRALinear(
                base,
                config.rank_for(name),
                config.alpha_for(name),
                config.dropout,
                config.rslora,
                config.dora,
            ),
        )
    _set_activation(model, config.invocation_tokens)
    return names


def _set_activation(model: nn.Module, invocation_tokens: Sequence[int]) -> None:
    """Make the model (and all its LoRA layers) activated by ``invocation_tokens``, or plain if empty."""
    activation = Activation(invocation_tokens) if invocation_tokens else None
    model.alora = activation
    for layer in lora_layers(model).values():
        layer.activation = activation


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_all(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def to_adapter(
    model: nn.Module, config: LoraConfig, base_fingerprint: str | None, extra: dict | None = None
) -> Adapter:
    """The model's LoRA weights as an :class:`Adapter` ready to save (activated as the model is)."""
    activation = getattr(model, "alora", None)
    modules = {}
    for name, layer in lora_layers(model).items():
        mag = None if layer.lora_magnitude is None else layer.lora_magnitude.detach().float().cpu().numpy()
        modules[name] = LoraWeights(
            a=layer.lora_A.detach().float().cpu().numpy(),
            b=layer.lora_B.detach().float().cpu().numpy(),
            alpha=float(layer.alpha),
            magnitude=mag,
        )
    return Adapter(
        modules=modules,
        base_architecture=model.config.architecture,
        base_fingerprint=base_fingerprint,
        rslora=config.rslora,
        target_modules=sorted(modules),
        invocation_tokens=list(activation.tokens) if activation is not None else [],
        extra=extra or {},
    )


def load_adapter_into(model: nn.Module, adapter: Adapter, dropout: float = 0.0) -> None:
    """Wrap the adapter's modules with LoRA layers holding its weights (for evaluation or resuming)."""
    adapter.check_fits(model.config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, w in adapter.modules.items():
        parent, child = _parent(model, name)
        current = getattr(parent, child)
        base = current.base if isinstance(current, LoRALinear) else current
        layer = LoRALinear(base, w.rank, w.alpha, dropout, adapter.rslora, dora=w.magnitude is not None)
        with torch.no_grad():
            layer.lora_A.copy_(torch.from_numpy(np.ascontiguousarray(w.a)))
            layer.lora_B.copy_(torch.from_numpy(np.ascontiguousarray(w.b)))
            if w.magnitude is not None:
                layer.lora_magnitude.copy_(torch.from_numpy(np.ascontiguousarray(w.magnitude)))
        setattr(parent, child, layer)
    _set_activation(model, adapter.invocation_tokens)
