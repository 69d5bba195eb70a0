"""The base model as a GGUF file llama.cpp loads: architecture keys, tokenizer, tensors.

Float and the legacy block quants (q8_0, q4_0, q4_1, q5_0, q5_1) are encoded in numpy by gguf-py;
K-quants (q4_k_m, q5_k_m, q6_k) go through llama.cpp's own quantizer from an f16 intermediate.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from converters.gguf_tokenizer import read_vocab
from edge_lora.atomic import atomic_path
from edge_lora.gguf_format.base_tensors import base_tensor
from edge_lora.gguf_format.file_write import write_gguf
from edge_lora.gguf_format.names import FINGERPRINT_KEY, ROPE_FREQS, gguf_arch, llama3_rope_factors
from edge_lora.gguf_format.quant import K_QUANTS, check_quant, encode, file_type
from edge_lora.importance import Importance
from edge_lora.model_dir import ModelDir

if TYPE_CHECKING:
    import gguf


def export_gguf(
    model_dir: ModelDir,
    out_path: Path,
    quant: str = "q4_0",
    progress: Callable[[str], None] | None = None,
    importance: Importance | None = None,
) -> Path:
    """Write ``model_dir`` as one GGUF file of the given quantization; returns ``out_path``.
    ``importance`` (calibration, edge_lora/importance.py) weighs the q4_0/q5_0 scale search."""
    quant = check_quant(quant)
    out_path = Path(out_path)
    say = progress or (lambda _msg: None)
    if quant in K_QUANTS:
        from converters.gguf_kquant import llama_quantize

        with tempfile.TemporaryDirectory(dir=out_path.parent if out_path.parent.exists() else None) as tmp:
            intermediate = Path(tmp) / "model-f16.gguf"
            write_gguf(_writer(model_dir, "f16", say), intermediate, "GGUF file", durable=False)
            say(f"quantizing to {quant} with llama.cpp")
            with atomic_path(out_path) as dst:
                llama_quantize(intermediate, dst, file_type(quant))
        return out_path
    return write_gguf(_writer(model_dir, quant, say, importance), out_path, "GGUF file")


def _writer(
    model_dir: ModelDir, quant: str, say: Callable[[str], None], importance: Importance | None = None
) -> gguf.GGUFWriter:
    """A ``GGUFWriter`` (no path yet) holding the model's keys, tokenizer and tensors in ``quant``."""
    import gguf

    config = model_dir.config
    if config.sliding_window and config.sliding_window < config.max_position_embeddings:
        say(
            f"note: llama.cpp runs this {config.model_type} with full attention; it matches the sliding "
            f"window of {config.sliding_window} only for contexts up to that length"
        )
    vocab = read_vocab(model_dir.tokenizer_path, model_dir.tokenizer_config, config)
    for note in vocab.notes:
        say(f"note: {note}")
    writer = gguf.GGUFWriter(None, gguf_arch(config))
    writer.add_name(model_dir.path.name)
    writer.add_file_type(file_type(quant))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_vocab_size(config.vocab_size)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_string(FINGERPRINT_KEY, model_dir.fingerprint)  # lets the runtime check adapters against it
    vocab.write(writer)
    _add_tensors(writer, model_dir, quant, say, importance)
    return writer


def _add_tensors(
    writer: gguf.GGUFWriter,
    model_dir: ModelDir,
    quant: str,
    say: Callable[[str], None],
    importance: Importance | None = None,
) -> None:
    """Every weight under its GGUF name, q/k rows in llama.cpp's order, each in its tensor type."""
    import gguf

    config = model_dir.config
    names = [
        n for n in model_dir.tensor_names() if not (config.tie_word_embeddings and n == "lm_head.weight")
    ]
    for i, name in enumerate(names):
        target, array, qtype = base_tensor(config, name, model_dir.get(name), quant)
        columns = None if importance is None else importance.for_tensor(name)
        writer.add_tensor(target, encode(array, qtype, columns), raw_dtype=qtype)
        if i % 20 == 0:
            say(f"gguf {quant}: tensor {i + 1}/{len(names)} {target}")
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor(ROPE_FREQS, factors, raw_dtype=gguf.GGMLQuantizationType.F32)
