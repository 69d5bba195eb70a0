"""Write the ONNX part of a bundle: model.onnx with LoRA slots, its data, and what onnxruntime-genai needs.

out_dir/
  model.onnx          the decoder with a LoRA slot on every linear layer (what onnxruntime-genai loads)
  model.plain.onnx    the same graph without the LoRA nodes, for requests with no adapter (same data file)
  model.onnx.data     every weight, each tensor aligned so ONNX Runtime can memory-map it
  onnx_layout.json    LoRA slots and groups, where each linear weight lives (the runtime merges through it)
  genai_config.json, tokenizer.json, tokenizer_config.json
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
from onnx import TensorProto

from converters.onnx_adapter import export_onnx_adapter  # noqa: F401  (part of this module's contract)
from converters.onnx_decoder import DecoderOptions, DecoderWriter, config_summary
from edge_lora.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from edge_lora.errors import EdgeLoraError
from edge_lora.importance import Importance
from edge_lora.model_dir import ModelDir
from edge_lora.onnx_format import names

PLAIN_MODEL_FILE = "model.plain.onnx"
# new tokens' inputs: the LoRA graph's only
ADDED_INPUTS = (names.ADDED_EMBED_ROWS, names.ADDED_HEAD_ROWS, names.ADDED_INDEX)
PAGE = 4096
ONNX_DTYPE_NAMES = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.UINT8: "uint8",
    TensorProto.INT8: "int8",
    TensorProto.INT4: "int4",
    TensorProto.INT64: "int64",
    TensorProto.INT32: "int32",
}


def export_onnx(
    model_dir: ModelDir,
    out_dir: Path,
    quant: str = "int4",
    variant: str = "fast",
    progress: Callable[[str], None] | None = None,
    *,
    lora_dtype: str = "float32",
    block_size: int = 32,
    importance: Importance | None = None,
) -> Path:
    """Write the decoder for ``model_dir`` into ``out_dir``; returns the path of model.onnx."""
    _check_choices(quant, variant)
    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"onnx {quant}-{variant}: building the graph ({config_summary(md.config)})")
    writer = DecoderWriter(
        md,
        DecoderOptions(
            quant=quant, variant=variant, lora_dtype=lora_dtype, block_size=block_size, importance=importance
        ),
    )
    model = writer.build()
    say(f"onnx {quant}-{variant}: writing {len(model.graph.initializer)} tensors")
    tensors = _write_external_data(model, out_dir / names.DATA_FILE)
    model_path = out_dir / names.MODEL_FILE
    atomic_write_bytes(model_path, model.SerializeToString())
    atomic_write_bytes(out_dir / PLAIN_MODEL_FILE, strip_lora(model).SerializeToString())
    layout = _layout(md, writer, tensors, quant=quant, variant=variant, lora_dtype=lora_dtype)
    atomic_write_text(out_dir / names.LAYOUT_FILE, json.dumps(layout, indent=1) + "\n")
    _write_genai_files(md, out_dir, variant)
    megabytes = (out_dir / names.DATA_FILE).stat().st_size / 1e6
    say(f"onnx {quant}-{variant}: done ({megabytes:.1f} MB of weights)")
    return model_path


def _check_choices(quant: str, variant: str) -> None:
    if quant not in names.QUANTS:
        raise EdgeLoraError(
            f"unknown ONNX quantization {quant!r}", hint=f"choose one of {', '.join(names.QUANTS)}"
        )
    if variant not in names.VARIANTS:
        raise EdgeLoraError(
            f"unknown ONNX variant {variant!r}", hint=f"choose one of {', '.join(names.VARIANTS)}"
        )


def _layout(
    md: ModelDir, writer: DecoderWriter, tensors: dict, *, quant: str, variant: str, lora_dtype: str
) -> dict:
    """onnx_layout.json: LoRA slots and groups, and where each linear weight and tensor lives."""
    return {
        "format": names.LAYOUT_FORMAT,
        "version": names.LAYOUT_VERSION,
        "quant": quant,
        "variant": variant,
        "lora_dtype": lora_dtype,
        "data_file": names.DATA_FILE,
        "plain_model": PLAIN_MODEL_FILE,
        "dora": True,
        "tied_head_dora": bool(md.config.tie_word_embeddings),
        "added_rows": {
            "embed": names.ADDED_EMBED_ROWS,
            "head": None if md.config.tie_word_embeddings else names.ADDED_HEAD_ROWS,
        },
        "lora_slots": {m: list(shape) for m, shape in names.lora_slots(md.config).items()},
        "lora_groups": {g: [list(member) for member in members] for g, members in writer.groups.items()},
        "linears": writer.layout["linears"],
        "weights": writer.layout["weights"],
        "tensors": tensors,
    }


def _write_genai_files(md: ModelDir, out_dir: Path, variant: str) -> None:
    """genai_config.json and the tokenizer files onnxruntime-genai reads beside the model."""
    atomic_write_text(out_dir / "genai_config.json", json.dumps(genai_config(md, variant), indent=2) + "\n")
    _copy(md.tokenizer_path, out_dir / "tokenizer.json")
    atomic_write_text(
        out_dir / "tokenizer_config.json", json.dumps(md.tokenizer_config or {}, indent=2) + "\n"
    )


def _write_external_data(model: onnx.ModelProto, data_path: Path) -> dict:
    """Move every non-empty initializer into one data file, page-aligned; returns where each one went."""
    placed = {}
    with atomic_path(data_path) as tmp, open(tmp, "wb") as f:
        offset = 0
        for tensor in model.graph.initializer:
            raw = (
                tensor.raw_data
                if tensor.HasField("raw_data")
                else onnx.numpy_helper.to_array(tensor).tobytes()
            )
            if not raw or tensor.name.endswith(".dora_scale"):
                continue  # the rank-0 LoRA defaults and the 1.0 DoRA defaults stay inline
            pad = (-offset) % (PAGE if len(raw) >= PAGE else 64)
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            placed[tensor.name] = {
                "offset": offset,
                "length": len(raw),
                "dtype": ONNX_DTYPE_NAMES[tensor.data_type],
                "shape": list(tensor.dims),
            }
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (
                ("location", data_path.name),
                ("offset", str(offset)),
                ("length", str(len(raw))),
            ):
                tensor.external_data.add(key=key, value=value)
            offset += len(raw)
    return placed


def strip_lora(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without LoRA nodes and inputs: each ``.../lora/Add`` is bypassed to its base input."""
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    graph = plain.graph
    bypassed = ("/lora/Add", "/lora/DoraScale", "/lora/Added")  # each passes its first input through
    bypass = {n.output[0]: n.input[0] for n in graph.node if n.name.endswith(bypassed)}
    keep = [n for n in graph.node if "/lora/" not in n.name]  # logits_to_keep stays: it is no LoRA input
    for node in keep:
        for i, name in enumerate(node.input):
            # a DoRA Mul feeds a bias Add or the LoRA Add: follow the chain to the matmul
            while name in bypass:
                name = bypass[name]
            node.input[i] = name
    del graph.node[:]
    graph.node.extend(keep)
    lora = lambda name: (  # noqa: E731
        name.endswith((".lora_A.T", ".lora_B.T", ".dora_scale")) or name in ADDED_INPUTS
    )
    inputs = [i for i in graph.input if not lora(i.name)]
    inits = [t for t in graph.initializer if not lora(t.name)]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return plain


def genai_config(md: ModelDir, variant: str = "fast") -> dict:
    """The genai_config.json that lets onnxruntime-genai load the folder as it is.

    The fast variant's GroupQueryAttention updates a KV buffer shared by past and present in place,
    as our engine runs it; the portable variant's Concat cache grows each step."""
    c = md.config
    eos = c.eos_token_id or [0]
    layer = "%d"
    return {
        "model": {
            "bos_token_id": c.bos_token_id if c.bos_token_id is not None else eos[0],
            "context_length": c.max_position_embeddings,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": names.MODEL_FILE,
                "head_size": c.head_dim,
                "hidden_size": c.hidden_size,
                "inputs": {
                    "input_ids": names.INPUT_IDS,
                    "attention_mask": names.ATTENTION_MASK,
                    "past_key_names": names.past_key(0).replace(".0.", f".{layer}."),
                    "past_value_names": names.past_value(0).replace(".0.", f".{layer}."),
                },
                "outputs": {
                    "logits": names.LOGITS,
                    "present_key_names": names.present_key(0).replace(".0.", f".{layer}."),
                    "present_value_names": names.present_value(0).replace(".0.", f".{layer}."),
                },
                "num_attention_heads": c.num_attention_heads,
                "num_hidden_layers": c.num_hidden_layers,
                "num_key_value_heads": c.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": eos[0],
            "type": c.model_type,
            "vocab_size": c.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": c.max_position_embeddings,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": variant == "fast",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


__all__ = ["export_onnx", "export_onnx_adapter", "strip_lora", "genai_config", "PLAIN_MODEL_FILE"]
