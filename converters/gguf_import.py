"""A GGUF base model as a Hugging Face folder: config.json, model.safetensors, the tokenizer files.

The way back from what llama.cpp users have (a .gguf from Ollama, LM Studio or a model card) to what
``edge-lora train`` and ``export`` take. Every tensor is dequantized by gguf-py's own
``gguf.quants.dequantize`` (f32, f16, bf16, the legacy block quants and the k-quants), q/k rows are
put back from llama.cpp's rotary order into Hugging Face's, and the weights are written float32 by
default (the dequantized values exactly), f16 or bf16 on request. A tied model has no
``output.weight``. No torch, no transformers.

The file is checked before anything is written (edge_lora/gguf_format/file_read.py: every count and
offset inside the file; then the architecture, every tensor's name, shape and type), and the folder
is built beside ``out`` and moved into place whole: a refused or broken file leaves no folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from converters.bundle_staging import make_readable, move_into_place, scratch_dir
from converters.gguf_import_config import model_config
from converters.gguf_import_tokenizer import tokenizer_files
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.file_read import field_value, open_gguf
from edge_lora.gguf_format.names import from_gguf_rows, hf_tensor

if TYPE_CHECKING:
    import gguf

IMPORTER_VERSION = 1  # bump when the folder an import writes changes meaning
DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
# tensor types imported (gguf.GGMLQuantizationType names): floats, legacy block quants, k-quants
TENSOR_TYPES = "F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K".split()
# what an import's output depends on: this code, what it imports of ours, and the two libraries it runs
_SOURCES = ("gguf_import.py", "gguf_import_config.py", "gguf_import_tokenizer.py", "gguf_tokenizer.py")
_CORE_SOURCES = ("config.py", "gguf_format/file_read.py", "gguf_format/names.py")


@dataclass
class _Plan:
    name: str  # Hugging Face tensor name
    tensor: gguf.ReaderTensor
    shape: tuple[int, ...]  # numpy order


def import_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "f32",
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the GGUF base at ``gguf_path`` as a Hugging Face folder ``out_dir``; returns ``out_dir``."""
    path, out = Path(gguf_path), Path(out_dir)
    say = progress or (lambda _msg: None)
    if dtype not in DTYPES:
        raise EdgeLoraError(f"unknown dtype {dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
    _check_out(out, force)
    reader = open_gguf(path)
    config, hf_config = model_config(reader, path)
    plan = _plan(reader, config, path)
    files = tokenizer_files(reader, path, config.max_position_embeddings)
    tokens = len(field_value(reader, "tokenizer.ggml.tokens"))
    if tokens > config.vocab_size:
        raise EdgeLoraError(
            f"the vocabulary has {tokens} tokens but token_embd.weight only {config.vocab_size} rows",
            path=path,
            hint="the file is corrupt",
        )
    files["config.json"] = json.dumps(hf_config, indent=2) + "\n"
    files["generation_config.json"] = json.dumps(_generation_config(reader, hf_config), indent=2) + "\n"
    say(f"import {path.name}: {config.architecture}, {config.num_hidden_layers} layers, {len(plan)} tensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = scratch_dir(out, "partial")
    try:
        metadata = {"format": "pt", "source": path.name, "edge_lora_importer": importer_version()}
        _write_weights(staging / "model.safetensors", plan, config, DTYPES[dtype], metadata, path, say)
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        make_readable(staging)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {out}")
    return out


def importer_version() -> str:
    """The importer's version and a hash of its code and of gguf-py's and tokenizers' versions: a cache of
    imported folders keyed by it imports again when any of them changes."""
    from importlib.metadata import version

    digest = hashlib.sha256(f"gguf {version('gguf')} tokenizers {version('tokenizers')}\n".encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    for name in _CORE_SOURCES:
        digest.update((here.parent / "edge_lora" / name).read_bytes())
    return f"{IMPORTER_VERSION}-{digest.hexdigest()[:16]}"


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EdgeLoraError("output exists and is not a folder", path=out, hint="choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EdgeLoraError("output folder is not empty", path=out, hint="pass --force to replace it")


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` holds, with its shape."""
    h, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    biased = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} if config.attention_bias else set()
    if config.o_proj_bias:
        biased.add("self_attn.o_proj")
    if config.mlp_bias:
        biased |= {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (h,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (h,)
        for module, (rows, cols) in config.linear_shapes().items():
            shapes[f"{layer}.{module}.weight"] = (rows, cols)
            if module in biased:
                shapes[f"{layer}.{module}.bias"] = (rows,)
    return shapes


def _plan(reader: gguf.GGUFReader, config: ModelConfig, path: Path) -> list[_Plan]:
    """Each GGUF tensor under its Hugging Face name; refuses a missing, extra, misshapen or unknown one."""
    import gguf

    expected = _expected_shapes(config)
    plan = []
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # read into the config's rope scaling
        name = hf_tensor(tensor.name)
        if name is None or name not in expected:
            raise EdgeLoraError(
                f"tensor {tensor.name} has no place in a {config.architecture} checkpoint",
                path=path,
                hint="fused, MoE or multimodal tensors cannot be imported",
            )
        kind = gguf.GGMLQuantizationType(tensor.tensor_type).name
        if kind not in TENSOR_TYPES:
            raise EdgeLoraError(
                f"tensor {tensor.name} has type {kind}, which cannot be imported",
                path=path,
                hint=f"supported: {', '.join(TENSOR_TYPES)}",
            )
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if shape != expected[name]:
            raise EdgeLoraError(
                f"tensor {tensor.name} has shape {list(shape)}, the config says {list(expected[name])}",
                path=path,
                hint="the file is corrupt or not a plain Llama-family model",
            )
        plan.append(_Plan(name, tensor, shape))
    missing = sorted(set(expected) - {p.name for p in plan})
    if missing:
        raise EdgeLoraError(
            f"GGUF lacks the tensor for {missing[0]}", path=path, hint="the file is incomplete"
        )
    return sorted(plan, key=lambda p: p.name)


def _generation_config(reader: gguf.GGUFReader, hf_config: dict) -> dict:
    eos = [hf_config["eos_token_id"]] if hf_config.get("eos_token_id") is not None else []
    eot = field_value(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))  # an instruct model's end of turn also ends a reply
    out = {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if hf_config.get("pad_token_id") is not None:
        out["pad_token_id"] = hf_config["pad_token_id"]
    return {k: v for k, v in out.items() if v not in (None, [])}


def _weights(item: _Plan, config: ModelConfig, path: Path) -> np.ndarray:
    """One tensor as float32 in Hugging Face's layout."""
    from gguf.quants import dequantize

    try:
        array = np.asarray(dequantize(item.tensor.data, item.tensor.tensor_type), dtype=np.float32)
        array = array.reshape(item.shape)
    except (ValueError, NotImplementedError) as err:
        raise EdgeLoraError(f"tensor {item.tensor.name} cannot be dequantized ({err})", path=path) from None
    array = from_gguf_rows(config, item.name.rsplit(".", 1)[0], array)
    if not np.isfinite(array).all():
        raise EdgeLoraError(f"tensor {item.tensor.name} holds NaN or infinite values", path=path)
    return array


def _encode(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "F16":
        return array.astype(np.float16)
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # bf16, round to nearest even


def _write_weights(
    dst: Path,
    plan: list[_Plan],
    config: ModelConfig,
    dtype: str,
    metadata: dict[str, str],
    path: Path,
    say: Callable[[str], None],
) -> None:
    """model.safetensors, one tensor at a time: the header is known from the shapes before any data."""
    itemsize = 4 if dtype == "F32" else 2
    header: dict = {"__metadata__": metadata}
    offset = 0
    for item in plan:
        size = int(np.prod(item.shape)) * itemsize
        header[item.name] = {
            "dtype": dtype,
            "shape": list(item.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, item in enumerate(plan):
            f.write(memoryview(_encode(_weights(item, config, path), dtype)))
            if i % 20 == 0 or i == len(plan) - 1:
                kind = item.tensor.tensor_type.name
                say(f"import: tensor {i + 1}/{len(plan)} {item.name} ({kind} -> {dtype.lower()})")
        if f.tell() != 8 + len(raw) + offset:
            raise EdgeLoraError("the weights did not come out at their planned size", path=dst)
