"""Canonical module names and LoRA target selection.

Names are Hugging Face module paths (``model.layers.3.self_attn.q_proj``); everything else in
the project maps from these. Target specs follow PEFT: ``all-linear`` (every linear layer of
the decoder, not ``lm_head``), ``attention``, a list of names (a bare name matches as a
suffix, as in PEFT), or a regex string matched against the whole name.
"""

from __future__ import annotations

import re

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LM_HEAD = "lm_head"


def linear_modules(config: ModelConfig, include_lm_head: bool = False) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` for every linear layer, in model order."""
    shapes = config.linear_shapes()
    modules = {
        f"model.layers.{i}.{short}": shapes[short]
        for i in range(config.num_hidden_layers)
        for short in (*ATTENTION, *MLP)
    }
    if include_lm_head:
        modules[LM_HEAD] = (config.vocab_size, config.hidden_size)
    return modules


def select_targets(config: ModelConfig, spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Resolve a target spec to the sorted-in-model-order list of module names."""
    modules = list(linear_modules(config, include_lm_head=True))
    decoder = modules[:-1]
    if isinstance(spec, str):
        if spec == "all-linear":
            return decoder
        if spec == "attention":
            return [m for m in decoder if m.endswith(ATTENTION)]
        if spec == "mlp":
            return [m for m in decoder if m.endswith(MLP)]
        if "," in spec:
            return select_targets(config, [s.strip() for s in spec.split(",") if s.strip()])
        try:
            pattern = re.compile(spec)
        except re.error as err:
            raise EdgeLoraError(f"bad target regex {spec!r}: {err}") from None
        chosen = [m for m in modules if pattern.fullmatch(m)]
        if not chosen:  # a bare module name such as "q_proj" given as a string
            chosen = select_targets(config, [spec])
    else:
        chosen = [
            m
            for m in modules
            if any(m == s or m.endswith("." + s) or s == m.rsplit(".", 1)[-1] for s in spec)
        ]
    if not chosen:
        raise EdgeLoraError(
            f"target spec {spec!r} matches no linear module",
            hint="use all-linear, attention, mlp, names like q_proj,v_proj, "
            "or a regex over model.layers.N.self_attn.q_proj",
        )
    return chosen
