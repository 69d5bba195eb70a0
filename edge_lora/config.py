"""The model config: a dataclass read from a Hugging Face ``config.json``.

Tolerant of unknown keys (real configs carry dozens we do not need), strict about the
architecture: only the Llama family is supported, and anything else gets an error that
lists what is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge_lora.errors import EdgeLoraError

if TYPE_CHECKING:
    import numpy as np

_BAD_CONFIG = "the model config is corrupt; use the config.json the model was trained with"

# architecture name in config.json -> model_type
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and o for Llama) biases
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    sliding_window: int | None = None

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def o_proj_bias(self) -> bool:
        # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too.
        return self.attention_bias and self.model_type == "llama"

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict, *, path: str | os.PathLike | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise EdgeLoraError(
                f"unsupported architecture {arch!r}",
                path=path,
                hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise EdgeLoraError(
                f"unsupported hidden_act {raw.get('hidden_act')!r}", path=path, hint="only silu is supported"
            )
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            rope = _rope(raw)
            eos = raw.get("eos_token_id")
            config = cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope[0],
                rope_scaling=rope[1],
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", False))
                or SUPPORTED_ARCHITECTURES[arch] == "qwen2",
                mlp_bias=bool(raw.get("mlp_bias", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=[]
                if eos is None
                else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos]),
                sliding_window=_sliding_window(raw),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise EdgeLoraError(
                f"config.json is missing or has a bad value: {err}", path=path, hint=_BAD_CONFIG
            ) from None
        config.validate(path)
        return config

    def validate(self, path: str | os.PathLike | None = None) -> None:
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise EdgeLoraError(f"config value {name} must be positive", path=path, hint=_BAD_CONFIG)
        if self.num_attention_heads % self.num_key_value_heads:
            raise EdgeLoraError(
                "num_attention_heads must be a multiple of num_key_value_heads", path=path, hint=_BAD_CONFIG
            )
        if self.head_dim % 2:
            raise EdgeLoraError("head_dim must be even for rotary embeddings", path=path, hint=_BAD_CONFIG)
        if self.rope_scaling and self.rope_scaling.get("rope_type", "default") not in (
            "default",
            "llama3",
            "linear",
        ):
            raise EdgeLoraError(
                f"unsupported rope_scaling type {self.rope_scaling.get('rope_type')!r}",
                path=path,
                hint="supported: llama3, linear",
            )

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise EdgeLoraError(
                "no config.json here", path=model_dir, hint="pass a Hugging Face model directory"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise EdgeLoraError(
                f"config.json is not valid JSON ({err.__class__.__name__})",
                path=path,
                hint="pass a Hugging Face model directory with an intact config.json",
            ) from None
        if not isinstance(raw, dict):
            raise EdgeLoraError("config.json must hold a JSON object", path=path)
        return cls.from_dict(raw, path=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict:
        """A config.json that transformers (any version) reads back as the same model."""
        raw = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0]
            if len(self.eos_token_id) == 1
            else (self.eos_token_id or None),
        }
        if self.model_type == "llama":
            raw.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        return raw

    @classmethod
    def from_saved(cls, raw: dict) -> ModelConfig:
        """Inverse of ``to_dict`` (bundle.json), tolerant of keys added by later versions."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    # --- shapes the adapter and the exporters check against -----------------------------

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{short module name: (out_features, in_features)}`` of each decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (self.q_dim, h),
            "self_attn.k_proj": (self.kv_dim, h),
            "self_attn.v_proj": (self.kv_dim, h),
            "self_attn.o_proj": (h, self.q_dim),
            "mlp.gate_proj": (i, h),
            "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i),
        }

    def rope_inv_freq(self) -> np.ndarray:
        """Rotary inverse frequencies, with llama3 / linear scaling applied (numpy, float64)."""
        import numpy as np

        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            inv = inv / float(scaling["factor"])
        elif kind == "llama3":
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_ctx = float(scaling["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled)
        return inv


def _arch_from_model_type(model_type: str | None) -> str | None:
    for arch, kind in SUPPORTED_ARCHITECTURES.items():
        if kind == model_type:
            return arch
    return model_type


def _rope(raw: dict) -> tuple[float, dict | None]:
    """Old configs say rope_theta + rope_scaling; transformers 5 says rope_parameters."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return theta, scaling


def _sliding_window(raw: dict):
    if raw.get("model_type") == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None
