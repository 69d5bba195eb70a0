"""A quantized frozen base for training (QLoRA-style, on any device including a CPU).

Each decoder linear layer keeps its weight as int8 (or int4, two per byte) with one fp16 scale per
group of ``group_size`` input columns (symmetric absmax). The device formats (:mod:`.device_quant`)
hand in their own codes, scales (fp16 for GGUF blocks, fp32 for MatMulNBits) and, for asymmetric
blocks, a zero point per group: ``w = (q - zero) * scale``. Forward and backward dequantize the
layer's weight on the fly and drop it right after the matmul; autograd saves only the quantized
tensors, so a dequantized weight never outlives its layer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx

DEFAULT_GROUP = {"int8": 128, "int4": 32}


def quantize(
    weight: np.ndarray | torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(qweight, scales [out, in/g] fp16, group)``; int8 ``[out, in]`` or packed int4
    ``[out, in/2]`` uint8."""
    w = (
        torch.as_tensor(np.asarray(weight, dtype=np.float32))
        if isinstance(weight, np.ndarray)
        else weight.detach().float()
    )
    out_f, in_f = w.shape
    group = group_size if group_size and in_f % group_size == 0 else in_f
    if bits == 4 and group % 2:
        group = in_f
    wg = w.reshape(out_f, in_f // group, group)
    qmax = 127 if bits == 8 else 7
    scale = (wg.abs().amax(-1, keepdim=True) / qmax).to(torch.float16).float().clamp_min(1e-8)
    q = (
        torch.round(wg / scale)
        .clamp_(-qmax - (1 if bits == 4 else 0), qmax)
        .to(torch.int8)
        .reshape(out_f, in_f)
    )
    if bits == 4:
        q = pack_int4(q)
    return q.contiguous(), scale.squeeze(-1).to(torch.float16).contiguous(), group


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed codes -8..7 ``[out, in]`` -> ``[out, in/2]`` uint8 (``q + 8``, even column low nibble)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(q - zeros) * scales`` per group, each step exact or rounded once in ``dtype`` (as the
    device formats compute it, so fp32 gives their very values)."""
    out_f = q.shape[0]
    if bits == 4:
        lo = (q & 0x0F).to(torch.int8) - 8
        hi = (q >> 4).to(torch.int8) - 8
        q = torch.stack((lo, hi), dim=-1).reshape(out_f, in_features)
    groups = scales.shape[1]
    w = q.to(dtype).view(out_f, groups, in_features // groups)
    if zeros is not None:
        w.sub_(zeros.to(dtype)[:, :, None])
    w.mul_(scales.to(dtype)[:, :, None])  # in place: one full-size temporary per call, not two
    return w.view(out_f, in_features)


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` stand-in holding quantized weights. ``weight`` is the integer tensor."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        in_features: int,
        out_features: int,
        bias: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
    ):
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.register_buffer("weight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)  # None: symmetric
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_weight(
        cls,
        weight: np.ndarray | torch.Tensor,
        bias: np.ndarray | torch.Tensor | None,
        bits: int,
        group_size: int = 0,
    ) -> QuantLinear:
        group_size = group_size or DEFAULT_GROUP["int8" if bits == 8 else "int4"]
        q, s, _ = quantize(weight, bits, group_size)
        w_shape = weight.shape
        b = (
            None
            if bias is None
            else torch.as_tensor(np.asarray(bias, np.float32))
            if isinstance(bias, np.ndarray)
            else bias
        )
        return cls(q, s, bits, w_shape[1], w_shape[0], b)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.scales, self.bits, self.in_features, dtype, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantMatmul.apply(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group={self.in_features // self.scales.shape[1]}"
        )


def quant_bits(name: str) -> int:
    return {"int8": 8, "int4": 4}[name]


def quantized_bytes(model: nn.Module) -> int:
    return sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, QuantLinear)
        for t in (m.weight, m.scales, m.zeros)
        if t is not None
    )


class QuantEmbedding(nn.Module):
    """A frozen embedding table kept quantized (rows like :class:`QuantLinear`'s, grouped along the
    hidden size). A lookup dequantizes only the rows it gathers; :meth:`rows` hands out a slice
    dequantized, which the output head and the loss use chunk by chunk on a tied base, so the
    full-precision table never exists."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        vocab: int,
        hidden: int,
        zeros: torch.Tensor | None = None,
    ):
        super().__init__()
        self.bits, self.vocab, self.hidden = bits, vocab, hidden
        # what lookups return: the model's compute dtype (bf16 keeps the residual stream bf16)
        self.dtype = torch.float32
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)  # None: symmetric

    @classmethod
    def from_weight(cls, weight: np.ndarray | torch.Tensor, bits: int, group_size: int = 0) -> QuantEmbedding:
        group_size = group_size or DEFAULT_GROUP["int8" if bits == 8 else "int4"]
        q, s, _ = quantize(weight, bits, group_size)
        return cls(q, s, bits, weight.shape[0], weight.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.vocab, self.hidden

    @property
    def weight(self) -> torch.Tensor:
        """The whole table dequantized (a temporary: for initialising new rows, not for the hot path)."""
        return self.rows(0, self.vocab)

    def rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        zeros = None if self.zeros is None else self.zeros[start:end]
        return dequantize(
            self.qweight[start:end], self.scales[start:end], self.bits, self.hidden, dtype, zeros
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        zeros = None if self.zeros is None else self.zeros[flat]
        out = dequantize(self.qweight[flat], self.scales[flat], self.bits, self.hidden, self.dtype, zeros)
        return out.view(*ids.shape, self.hidden)

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, hidden={self.hidden}, bits={self.bits}"


class TiedQuantHead(nn.Module):
    """The output layer of a tied base whose table is a :class:`QuantEmbedding`: logits through
    vocabulary chunks of the quantized table (``weight`` is the table, for the chunked loss)."""

    CHUNK_ROWS = 8192

    def __init__(self, table: QuantEmbedding):
        super().__init__()
        self.table = table

    @property
    def weight(self) -> QuantEmbedding:
        return self.table

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = [
            hidden @ self.table.rows(s, min(s + self.CHUNK_ROWS, self.table.vocab), hidden.dtype).t()
            for s in range(0, self.table.vocab, self.CHUNK_ROWS)
        ]
        return torch.cat(parts, dim=-1)
