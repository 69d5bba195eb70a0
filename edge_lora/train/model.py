"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) in one readable file.

Module names equal Hugging Face's, so a checkpoint's ``state_dict`` loads as it is and LoRA
module names are the canonical ones. Logits match transformers' within 1e-4 in fp32.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir

if TYPE_CHECKING:
    from edge_lora.train.lora import Activation


def _sdpa_supports_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try it
        try:
            z = torch.zeros(1, 2, 1, 2)
            F.scaled_dot_product_attention(z, z[:, :1], z[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


_SDPA_GQA = _sdpa_supports_gqa()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm whose backward keeps only the input and ``1/rms`` (not every intermediate)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        grad_w = (
            (grad * xhat.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        )
        grad_x = None
        if ctx.needs_input_grad[0]:
            gy = (grad * weight).to(rstd.dtype)
            grad_x = (rstd * (gy - xhat * (gy * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` keeping only ``gate`` and ``up`` for the backward pass."""

    @staticmethod
    def forward(ctx: FunctionCtx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig)))
        return grad_gate, grad * silu


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq = torch.tensor(config.rope_inv_freq(), dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` for positions ``[t]`` (shape ``[t, d]``) or per row ``[b, t]``
        (``[b, 1, t, d]``)."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        return (cos[:, None], sin[:, None]) if positions.dim() == 2 else (cos, sin)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=config.o_proj_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        groups = c.num_attention_heads // c.num_key_value_heads
        if groups > 1 and not _SDPA_GQA:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        gqa = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
        # mask None = plain causal attention (the fast kernels' is_causal path)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.rotary = Rotary(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        self.alora: Activation | None = None  # an activated adapter's LoRA layers (see train.lora)

    def causal_mask(
        self, t: int, attention_mask: torch.Tensor | None, device: torch.device | str | None
    ) -> torch.Tensor:
        """Boolean ``[b|1, 1, t, t]`` mask: causal, sliding window (Mistral), and padding."""
        i = torch.arange(t, device=device)
        allowed = i[None, :] <= i[:, None]
        if self.config.sliding_window:
            allowed &= i[:, None] - i[None, :] < self.config.sliding_window
        mask = allowed[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded rows: attend anywhere, output ignored
        return mask

    def packed_mask(self, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask [b, 1, t, t], positions [b, t])`` for packed rows: causal within each segment
        (and within the sliding window), positions restarting at each segment."""
        t = segments.shape[1]
        i = torch.arange(t, device=segments.device)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        positions = i - torch.cummax(torch.where(starts, i, 0), dim=1).values
        allowed = (i[None, :] <= i[:, None])[None] & (segments[:, :, None] == segments[:, None, :])
        if self.config.sliding_window:
            allowed &= (i[:, None] - i[None, :])[None] < self.config.sliding_window
        return allowed[:, None], positions

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``segments`` (packed rows, see ``data.pack``) keeps each example's attention and positions
        to itself. An activated adapter (``self.alora``) gets its positions from ``input_ids`` here,
        per example of a packed row; they stay current for ``lm_head`` until the next call."""
        b, t = input_ids.shape
        active = None if self.alora is None else self.alora.select(input_ids, segments)
        x = self.model.embed_tokens(input_ids)
        if segments is not None:
            mask, positions = self.packed_mask(segments)
            cos, sin = self.rotary(positions)
        else:
            cos, sin = self.rotary(torch.arange(t, device=input_ids.device))
            window = self.config.sliding_window
            needs_mask = attention_mask is not None or (window and t > window)
            mask = self.causal_mask(t, attention_mask, input_ids.device) if needs_mask else None
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and active is not None:
                x = torch.utils.checkpoint.checkpoint(
                    self._activated_layer, layer, active, x, cos, sin, mask, use_reentrant=False
                )
            elif self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.model.norm(x)

    def _activated_layer(
        self,
        layer: DecoderLayer,
        active: tuple,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """A checkpointed layer of an activated model: its recomputation in the backward pass sees this
        batch's positions, whatever ran since."""
        self.alora.current = active
        return layer(x, cos, sin, mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask))

    @classmethod
    def from_model_dir(
        cls, path: str | os.PathLike | ModelDir, dtype: torch.dtype = torch.float32
    ) -> CausalLM:
        md = path if isinstance(path, ModelDir) else ModelDir(path)
        with torch.device("meta"):
            model = cls(md.config)
        model = model.to_empty(device="cpu")
        if md.config.tie_word_embeddings:  # to_empty unties shared parameters
            model.lm_head.weight = model.model.embed_tokens.weight
        model.rotary.inv_freq = torch.tensor(md.config.rope_inv_freq(), dtype=torch.float32)
        expected = {
            k for k in model.state_dict() if not (md.config.tie_word_embeddings and k == "lm_head.weight")
        }
        names = set(md.tensor_names())
        missing = expected - names
        if md.config.tie_word_embeddings:
            names.discard("lm_head.weight")  # some tied checkpoints store it anyway
        if missing:
            raise EdgeLoraError(
                f"weights are missing {len(missing)} tensors, e.g. {sorted(missing)[0]!r}",
                path=md.path,
                hint="is this the model config.json describes?",
            )
        unexpected = names - expected
        if unexpected:
            raise EdgeLoraError(
                f"weights hold tensors this model does not have, e.g. {sorted(unexpected)[0]!r}", path=md.path
            )
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in expected:
                arr = md.get(name)
                if tuple(arr.shape) != tuple(params[name].shape):
                    raise EdgeLoraError(
                        f"tensor {name!r} has shape {list(arr.shape)}, "
                        f"config.json implies {list(params[name].shape)}",
                        path=md.path,
                    )
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(arr)))
        model.model_dir = md
        return model.to(dtype)
