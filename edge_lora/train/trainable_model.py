"""The model a run trains: the base loaded in fp32 (its linear layers quantized while loading when
asked), LoRA and new-token rows added, the frozen base in bf16 where that is the compute dtype, and
:class:`TrainModule`, the loss-returning module the loop (and DDP) calls."""

from __future__ import annotations

import torch
import torch.utils.checkpoint  # noqa: F401  (model.gradient_checkpointing uses it)
from torch import nn

from edge_lora.errors import EdgeLoraError
from edge_lora.importance import Importance, load_base_importance
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules
from edge_lora.train.config import TrainConfig
from edge_lora.train.device_quant import DEVICE_QUANTS, load_device_base
from edge_lora.train.devices import resolve_compute_dtype, resolve_device
from edge_lora.train.dtype_probe import to_dtype
from edge_lora.train.lora import LoraConfig, _parent, apply_lora
from edge_lora.train.loss import linear_cross_entropy
from edge_lora.train.model import CausalLM
from edge_lora.train.quant import QuantEmbedding, QuantLinear, TiedQuantHead, quant_bits
from edge_lora.train.tokens import add_new_tokens, head_weights


def load_model(
    md: ModelDir, base_quant: str = "none", group_size: int = 0, importance: Importance | None = None
) -> CausalLM:
    """The base model in fp32, its decoder linear layers quantized while loading when asked
    (so the full-precision weights are never all in memory at once)."""
    config = md.config
    with torch.device("meta"):
        model = CausalLM(config)
    names = set(md.tensor_names())
    if base_quant in DEVICE_QUANTS:  # the export's own formats, bit for bit
        load_device_base(model, md, base_quant, importance)
    elif base_quant != "none":
        _quantize_linears(model, md, names, base_quant, group_size)
    quant_table = isinstance(model.model.embed_tokens, QuantEmbedding)
    if base_quant in ("int8", "int4") and config.tie_word_embeddings:
        # the tied table is the largest tensor of a small model: lookup and head both read it quantized
        table = QuantEmbedding.from_weight(
            md.read_float32("model.embed_tokens.weight"), quant_bits(base_quant), group_size
        )
        model.model.embed_tokens, model.lm_head = table, TiedQuantHead(table)
        quant_table = True
    _load_float_weights(model, md, names)
    if config.tie_word_embeddings and not quant_table:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.inv_freq = torch.tensor(config.rope_inv_freq(), dtype=torch.float32)
    model.model_dir = md
    md.release()  # the checkpoint's memory maps are no longer needed
    return model


def _quantize_linears(
    model: CausalLM, md: ModelDir, names: set[str], base_quant: str, group_size: int
) -> None:
    """Replace each decoder linear layer by a :class:`QuantLinear` of its checkpoint weight."""
    for name in linear_modules(md.config):
        parent, child = _parent(model, name)
        if f"{name}.weight" not in names:
            raise EdgeLoraError(
                f"weights are missing {name}.weight",
                path=md.path,
                hint="is this the model config.json describes?",
            )
        bias = md.read_float32(f"{name}.bias") if f"{name}.bias" in names else None
        setattr(
            parent,
            child,
            QuantLinear.from_weight(
                md.read_float32(f"{name}.weight"), bias, quant_bits(base_quant), group_size
            ),
        )


def _load_float_weights(model: CausalLM, md: ModelDir, names: set[str]) -> None:
    """Fill every parameter still on the meta device from the checkpoint, frozen, shapes checked."""
    tied = md.config.tie_word_embeddings
    for module_name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            if full == "lm_head.weight" and tied:
                continue
            if full not in names:
                raise EdgeLoraError(
                    f"weights are missing {full!r}",
                    path=md.path,
                    hint="is this the model config.json describes?",
                )
            arr = md.read_float32(full)
            if tuple(arr.shape) != tuple(p.shape):
                raise EdgeLoraError(
                    f"tensor {full!r} has shape {list(arr.shape)}, config.json implies {list(p.shape)}",
                    path=md.path,
                )
            setattr(module, pname, nn.Parameter(torch.from_numpy(arr), requires_grad=False))


class TrainModule(nn.Module):
    """``forward(ids, targets) -> summed token loss``; what DDP wraps. A model stored in bf16 runs
    under bf16 autocast (the fp32 LoRA weights are cast per use; the loss is summed in fp32)."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model
        self.bf16 = model.model.norm.weight.dtype == torch.bfloat16  # set again when auto has measured

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            # right padding + causal attention: no mask needed, unless rows pack several examples
            hidden = self.model.hidden_states(ids, segments=segments)
            picked = targets[:, 1:]
            weight, extra = head_weights(self.model)
            return linear_cross_entropy(hidden[:, :-1][picked], ids[:, 1:][picked], weight, extra)


def lora_config(cfg: TrainConfig, invocation: list[int] | None = None) -> LoraConfig:
    return LoraConfig(
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        targets=cfg.targets,
        rslora=cfg.rslora,
        dora=cfg.dora,
        invocation_tokens=list(invocation or []),
    )


def build_model(
    md: ModelDir, cfg: TrainConfig, device: torch.device | None = None, invocation: list[int] | None = None
) -> CausalLM:
    """The run's model: its frozen base in bf16 when that is the compute dtype; kept in fp32 when
    ``auto`` has to measure first (``model.compute_dtype`` None: :mod:`.dtype_probe`). An aLoRA run's
    ``invocation`` tokens (tokenized from ``cfg.alora_invocation`` here when not given) activate it."""
    if cfg.alora_invocation and not invocation:
        from edge_lora.train.data import Formatter

        invocation = Formatter(md, cfg.add_tokens).invocation_tokens(cfg.alora_invocation)
    importance = load_base_importance(cfg.base_importance) if cfg.base_importance else None
    model = load_model(md, cfg.base_quant, cfg.quant_group_size, importance)
    # freezes everything, then adds trainable A/B (and magnitudes); activated when invocation is given
    apply_lora(model, lora_config(cfg, invocation))
    add_new_tokens(model, len(cfg.add_tokens))
    # the frozen base's size: a quantized base keeps its codes in buffers, not parameters
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() for b in model.buffers())
    dtype = resolve_compute_dtype(cfg.compute_dtype, device or resolve_device(cfg.device), frozen)
    if dtype == torch.bfloat16:
        to_dtype(model, torch.bfloat16)  # the frozen base once in bf16: no per-step casts, half the memory
    model.compute_dtype = dtype
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model
