"""The frozen base exactly as a device runs it: ``--base-quant q4_0 | q8_0`` (the GGUF export) and
``onnx-int4`` (the ONNX export's MatMulNBits graph).

Each weight goes through the exporter's own per-tensor decision and quantizer
(:func:`edge_lora.gguf_format.base_tensors.base_tensor` + ``encode``/``decode``;
:func:`edge_lora.onnx_format.base_weights.quantize_base_weight` + ``dequantize_nbits``), so whatever those
make the default, training follows. The dequantized result is then kept compact where the layout is a
grid of integer codes (q4_0 and q8_0 blocks: fp16 scale per 32; MatMulNBits: fp32 scale per block, zero
points on the tied table): a :class:`~.quant.QuantLinear` / :class:`~.quant.QuantEmbedding` whose codes
are read back from the device values and checked to dequantize to them bit for bit. Anything else
(f16/f32 tensors, other block types, a block size that does not divide the row) stays a float tensor
holding the device's values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.importance import Importance
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules

DEVICE_QUANTS = {"q4_0": "gguf", "q8_0": "gguf", "onnx-int4": "onnx"}


@dataclass
class DeviceWeight:
    """One weight as the device computes with it: ``dense`` float32 ``[out, in]`` (HF row order), and
    the codes of its grid when it has one (``codes`` int8 ``[out, in]``, ``scales``/``zeros``
    ``[out, groups]``; ``w = (codes - zeros) * scales``)."""

    dense: np.ndarray
    bits: int = 0
    codes: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @property
    def compact(self) -> bool:
        return self.codes is not None


def grid_weight(
    dense: np.ndarray, scales: np.ndarray, bits: int, group: int, zeros: np.ndarray | None = None
) -> DeviceWeight:
    """``dense`` with the codes of its grid (``scales``/``zeros`` ``[out, groups]``, ``group`` columns
    each), if they give it back bit for bit; else ``dense`` alone."""
    from edge_lora.train.quant import dequantize

    out_f, in_f = dense.shape
    groups = scales.shape[1]
    if in_f != groups * group or (bits == 4 and group % 2):
        return DeviceWeight(dense)
    s = torch.from_numpy(np.ascontiguousarray(scales))
    z = None if zeros is None else torch.from_numpy(np.ascontiguousarray(zeros, dtype=np.float32))
    w = torch.from_numpy(dense).view(out_f, groups, in_f // groups)
    safe = torch.where(s == 0, torch.ones_like(s), s).float()
    codes = torch.round(w / safe[:, :, None]) + (0 if z is None else z[:, :, None])
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    if codes.min() < lo or codes.max() > hi:
        return DeviceWeight(dense)
    codes = codes.to(torch.int8).view(out_f, in_f)
    z8 = None if z is None else z.to(torch.int8)
    stored = _pack(codes, bits)
    if not torch.equal(dequantize(stored, s, bits, in_f, torch.float32, z8), torch.from_numpy(dense)):
        return DeviceWeight(dense)
    return DeviceWeight(dense, bits, stored, s, z8)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    from edge_lora.train.quant import pack_int4

    return pack_int4(codes) if bits == 4 else codes.contiguous()


# --- GGUF ---------------------------------------------------------------------------------------


def gguf_weight(
    config: ModelConfig, name: str, array: np.ndarray, quant: str, importance: Importance | None = None
) -> DeviceWeight:
    """One checkpoint tensor through the GGUF exporter's decision and gguf-py's codec (weighted by the
    export's calibration, as the exporter does), back in HF row order."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from edge_lora.gguf_format.base_tensors import base_tensor
    from edge_lora.gguf_format.names import to_gguf_rows
    from edge_lora.gguf_format.quant import decode, encode

    _, rows, qtype = base_tensor(config, name, array, quant)
    data = encode(rows, qtype, None if importance is None else importance.for_tensor(name))
    dense = decode(data, qtype, rows.shape)
    # the exporter's row order, undone: gguf row i holds checkpoint row order[i]
    order = to_gguf_rows(config, name.rsplit(".", 1)[0], np.arange(rows.shape[0]))
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    dense = np.ascontiguousarray(dense[back])
    bits = {GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q8_0: 8}.get(qtype)
    if bits is None or dense.ndim != 2:
        return DeviceWeight(dense)
    # ggml's block_q4_0 / block_q8_0 open with the block's fp16 scale d: value = d * code
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(data).view(np.uint8).reshape(dense.shape[0], dense.shape[1] // block, size)
    scales = raw[..., :2].copy().view(np.float16)[..., 0][back]
    return grid_weight(dense, scales, bits, block)


# --- ONNX MatMulNBits -----------------------------------------------------------------------------


def nbits_weight(
    name: str, weight: np.ndarray, *, gathered: bool = False, importance: Importance | None = None
) -> DeviceWeight:
    """One fused group (or the tied table) through the ONNX exporter's quantizer; symmetric weights
    are dequantized with no zero points, as the graph (which leaves them out) reads them."""
    from edge_lora.onnx_format.base_weights import quantize_base_weight
    from edge_lora.onnx_format.weight_quant import dequantize_nbits

    columns = None if importance is None else importance.for_module(name)
    nb = quantize_base_weight(name, weight, "int4", gathered=gathered, importance=columns)
    if not gathered:
        nb = dataclasses.replace(nb, zero_points=None)
    dense = np.ascontiguousarray(dequantize_nbits(nb), dtype=np.float32)
    n, k_blocks = nb.n, nb.packed.shape[1]
    scales = nb.scales.reshape(n, k_blocks)
    zeros = None
    if nb.zero_points is not None:
        # the zero points through the format's own reader: all-zero codes at scale 1 dequantize to -zp;
        # in the signed codes (code - 8) they are zp - 8
        probe = dataclasses.replace(nb, packed=np.zeros_like(nb.packed), scales=np.ones_like(nb.scales))
        zp = -dequantize_nbits(dataclasses.replace(probe, k=k_blocks * nb.block_size))
        zeros = zp.reshape(n, k_blocks, nb.block_size)[:, :, 0] - 8
    return grid_weight(dense, scales, nb.bits, nb.block_size, zeros)


def onnx_groups(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """``{group: [(module, rows), ...]}``: the decoder's matmuls as the fast graph fuses them."""
    from edge_lora.onnx_format.names import lora_groups

    return {
        group: [(m, out_f) for m, out_f, _ in members]
        for group, members in lora_groups(config).items()
        if group != "lm_head"
    }


def check_supported(md: ModelDir, quant: str) -> None:
    config = md.config
    if DEVICE_QUANTS[quant] == "onnx" and config.tie_word_embeddings:
        from edge_lora.onnx_format.base_weights import shares_quantized_table

        if not shares_quantized_table(config, "int4"):
            raise EdgeLoraError(
                f"--base-quant onnx-int4 needs a hidden size that is a multiple of 32 on a tied base "
                f"(this one: {config.hidden_size})",
                path=md.path,
                hint="use --base-quant q4_0 or int4",
            )


# --- the model --------------------------------------------------------------------------------------


def load_device_base(
    model: nn.Module, md: ModelDir, quant: str, importance: Importance | None = None
) -> None:
    """Put the device's weights into ``model`` (built on the meta device): decoder linears, the
    embedding and the head. Norms and biases are stored as float32 by both exports: they load as usual."""
    check_supported(md, quant)
    config = md.config
    if DEVICE_QUANTS[quant] == "gguf":
        linears = (
            (m, gguf_weight(config, f"{m}.weight", md.read_float32(f"{m}.weight"), quant, importance))
            for m in linear_modules(config)
        )
    else:
        linears = _onnx_linears(md, importance)
    for module, weight in linears:
        _set_linear(model, md, module, weight)
    table = md.read_float32("model.embed_tokens.weight")
    if DEVICE_QUANTS[quant] == "gguf":
        embed = gguf_weight(config, "model.embed_tokens.weight", table, quant, importance)
        head = (
            None
            if config.tie_word_embeddings
            else gguf_weight(config, "lm_head.weight", _head(md), quant, importance)
        )
    elif config.tie_word_embeddings:
        embed, head = nbits_weight("lm_head", table, gathered=True, importance=importance), None
    else:  # the untied graph gathers from a float16 table
        embed = DeviceWeight(table.astype(np.float16).astype(np.float32))
        head = nbits_weight("lm_head", _head(md), importance=importance)
    _set_embeddings(model, embed, head)


def _head(md: ModelDir) -> np.ndarray:
    return md.read_float32("lm_head.weight")


def _onnx_linears(md: ModelDir, importance: Importance | None) -> Iterator[tuple[str, DeviceWeight]]:
    """Each fused group quantized as one matrix, handed out per member module (its rows)."""
    for group, members in onnx_groups(md.config).items():
        fused = np.concatenate([md.read_float32(f"{m}.weight") for m, _ in members], axis=0)
        weight = nbits_weight(group, fused, importance=importance)
        start = 0
        for module, rows in members:
            yield module, _rows(weight, start, start + rows)
            start += rows


def _rows(w: DeviceWeight, start: int, end: int) -> DeviceWeight:
    pick = (lambda t: None if t is None else t[start:end].contiguous()) if w.compact else (lambda t: t)
    return DeviceWeight(
        np.ascontiguousarray(w.dense[start:end]), w.bits, pick(w.codes), pick(w.scales), pick(w.zeros)
    )


def _set_linear(model: nn.Module, md: ModelDir, module: str, w: DeviceWeight) -> None:
    from edge_lora.train.lora import _parent
    from edge_lora.train.quant import QuantLinear

    parent, child = _parent(model, module)
    if not w.compact:
        getattr(parent, child).weight = _frozen(w.dense)
        return
    bias = md.read_float32(f"{module}.bias") if md.has(f"{module}.bias") else None
    out_f, in_f = w.dense.shape
    bias_t = None if bias is None else torch.from_numpy(bias)
    setattr(parent, child, QuantLinear(w.codes, w.scales, w.bits, in_f, out_f, bias_t, w.zeros))


def _set_embeddings(model: nn.Module, embed: DeviceWeight, head: DeviceWeight | None) -> None:
    """A tied table with codes becomes one :class:`QuantEmbedding` read by both lookup and head."""
    from edge_lora.train.quant import QuantEmbedding, TiedQuantHead

    if head is None and embed.compact:
        vocab, hidden = embed.dense.shape
        table = QuantEmbedding(embed.codes, embed.scales, embed.bits, vocab, hidden, embed.zeros)
        model.model.embed_tokens, model.lm_head = table, TiedQuantHead(table)
        return
    model.model.embed_tokens.weight = _frozen(embed.dense)
    if head is not None:
        model.lm_head.weight = _frozen(head.dense)


def _frozen(arr: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), requires_grad=False)
