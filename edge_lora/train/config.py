"""Every trainer setting in one dataclass, read from flags and/or a YAML or JSON file.

Precedence: dataclass defaults < config file < command-line flags. ``from_dict`` is tolerant:
dashes or underscores in keys, strings for numbers and booleans, unknown keys reported as a
warning (a typo should not abort a long run, but should not pass silently either).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edge_lora.errors import EdgeLoraError

# int8/int4: our own QLoRA-style grouping; q4_0/q8_0/onnx-int4: the export's formats, bit for bit
QUANT_CHOICES = ("none", "int8", "int4", "q4_0", "q8_0", "onnx-int4")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
COMPUTE_CHOICES = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    # inputs and outputs
    model: str | None = None
    data: str | None = None
    eval_data: str | None = None
    out: str | None = None
    log_file: str | None = None  # metrics JSONL; default <out>.log.jsonl
    # data
    seq_len: int = 512
    packing: bool = False
    eval_split: float = 0.05  # fraction carved off `data` when no eval file is given (0 = none)
    max_eval_samples: int = 0  # 0 = all
    # LoRA
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    rslora: bool = False
    dora: bool = False
    lora_plus_ratio: float = 0.0  # LoRA+: lr(B) = ratio * lr; 0 = off (16 is the paper's default)
    add_tokens: list[str] = field(default_factory=list)
    # activated LoRA (aLoRA): the adapter acts only from the last occurrence of this text's tokens on
    alora_invocation: str | None = None
    # optimisation
    lr: float = 2e-4
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1
    steps: int = 0  # optimizer steps; 0 = epochs * steps per epoch
    epochs: float = 1.0
    seed: int = 0
    # evaluation and early stopping
    eval_every: int = 0  # steps; 0 = at the end only
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0
    # checkpoints
    checkpoint_every: int = 0  # steps; 0 = none
    checkpoint_dir: str | None = None  # default <out>.checkpoints
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint file
    # memory and devices
    base_quant: str = "none"
    quant_group_size: int = 0  # 0 = default (128 for int8, 32 for int4)
    # the calibration the export's 4-bit base was quantized with: a bundle folder or importance.safetensors
    base_importance: str | None = None
    gradient_checkpointing: bool = False
    device: str = "auto"
    # bf16: the frozen base stored in bf16 and the forward under bf16 autocast (LoRA weights, optimizer
    # and loss stay fp32); auto = bf16 where the device computes it natively (AMX / AVX512-BF16 CPUs, CUDA)
    compute_dtype: str = "auto"
    threads: int = 0  # torch.set_num_threads; 0 = leave torch's default
    # output
    log_every: int = 1
    progress: bool = True

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict, *, path: str | os.PathLike | None = None, warn: bool = True) -> TrainConfig:
        config = cls()
        config.update(raw, path=path, warn=warn)
        return config

    def update(self, raw: dict, *, path: str | os.PathLike | None = None, warn: bool = True) -> TrainConfig:
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                if warn:
                    print(f"warning: {path or 'config'}: unknown setting {key!r} ignored", file=sys.stderr)
                continue
            setattr(self, name, _coerce(name, value, fields[name].default, path))
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> dict:
        """The settings in a YAML or JSON file, as a dict (merge it with ``update``)."""
        path = Path(path)
        if not path.is_file():
            raise EdgeLoraError("config file not found", path=path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as err:  # yaml.YAMLError / JSONDecodeError
            raise EdgeLoraError(
                f"cannot parse config file: {' '.join(str(err).split())}", path=path
            ) from None
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise EdgeLoraError("config file must hold a mapping of setting: value", path=path)
        return raw

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # --- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise EdgeLoraError(f"--{name.replace('_', '-')} is required")
        positive = ("seq_len", "rank", "batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise EdgeLoraError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise EdgeLoraError("seq-len must be at least 2")
        if not 0 <= self.eval_split < 1:
            raise EdgeLoraError(f"eval-split must be in [0, 1), got {self.eval_split}")
        if not 0 <= self.dropout < 1:
            raise EdgeLoraError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.base_quant not in QUANT_CHOICES:
            raise EdgeLoraError(
                f"base-quant must be one of {', '.join(QUANT_CHOICES)}, got {self.base_quant!r}"
            )
        if self.quant_group_size and self.base_quant in ("q4_0", "q8_0", "onnx-int4"):
            raise EdgeLoraError(
                f"--quant-group-size applies to int8/int4, not to {self.base_quant}",
                hint="the export's own formats keep their own blocks (32 values): drop --quant-group-size",
            )
        if self.compute_dtype not in COMPUTE_CHOICES:
            raise EdgeLoraError(
                f"compute-dtype must be one of {', '.join(COMPUTE_CHOICES)}, got {self.compute_dtype!r}"
            )
        if self.device not in DEVICE_CHOICES:
            raise EdgeLoraError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        for name in (
            "steps",
            "warmup_steps",
            "eval_every",
            "patience",
            "checkpoint_every",
            "threads",
            "max_eval_samples",
            "quant_group_size",
        ):
            if getattr(self, name) < 0:
                raise EdgeLoraError(f"{name.replace('_', '-')} must not be negative")
        if self.steps == 0 and self.epochs <= 0:
            raise EdgeLoraError("give --steps or a positive --epochs")
        if self.lr <= 0:
            raise EdgeLoraError("lr must be positive")
        if self.patience and not (self.eval_every and (self.eval_data or self.eval_split > 0)):
            raise EdgeLoraError(
                "early stopping (--patience) needs periodic evaluation",
                hint="add --eval-every N and an eval set",
            )
        if self.alora_invocation is not None:
            if not self.alora_invocation:
                raise EdgeLoraError(
                    "alora-invocation is empty", hint="give the text that invokes the adapter, or drop it"
                )
            if self.dora:
                raise EdgeLoraError(
                    "--alora-invocation cannot be combined with --dora (PEFT has no activated DoRA either)",
                    hint="drop one of them",
                )
        if self.keep_checkpoints < 1:
            raise EdgeLoraError("keep-checkpoints must be at least 1")

    @property
    def log_path(self) -> Path:
        return Path(self.log_file) if self.log_file else Path(str(self.out) + ".log.jsonl")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(str(self.out) + ".checkpoints")


# settings that may differ between a run and its resumption (everything else must match)
RESUME_FREE = {
    "steps",
    "epochs",
    "out",
    "log_file",
    "checkpoint_every",
    "checkpoint_dir",
    "keep_checkpoints",
    "resume",
    "device",
    "threads",
    "log_every",
    "progress",
    "patience",
    "eval_every",
    "min_delta",
    "max_eval_samples",
}


def _coerce(
    name: str, value: object, default: object, path: str | os.PathLike | None
) -> str | list[str] | bool | int | float | None:
    bad = EdgeLoraError(f"setting {name!r}: cannot use {value!r}", path=path)
    if value is None:
        return None
    if name in ("targets",):
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        return str(value)
    if name == "add_tokens":
        if isinstance(value, str):
            return [t for t in value.split(",") if t]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise bad
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if isinstance(default, int):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if f != int(f) or isinstance(value, bool):
            raise bad
        return int(f)
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    return str(value)
