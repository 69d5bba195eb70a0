"""Real checkpoints' published config.json values, cut to one or two layers, with random weights.

Nothing is downloaded: each :class:`RealShape` holds the config.json values the checkpoint publishes
(widths, vocabulary, heads and GQA ratio, head size, rope settings, norms, biases, sliding window,
tied or untied head, bos/eos ids), and :func:`make_real_model_dir` writes a model directory with
those shapes, ``num_hidden_layers`` cut to ``layers``, and random bf16 weights (the dtype these
checkpoints ship in).

Tokenizer: the tiny byte-level BPE of :mod:`tiny_models` (320 tokens) stands in for the real one.
config.json keeps the real ``vocab_size``, so the embedding and head have the real shapes; the
tokenizer's ids cover only the low end of that range and the rest are rows no text maps to, as in
real checkpoints whose embedding is padded past their tokenizer (Qwen2.5: 151665 tokens, 151936
rows). The real bos/eos ids are kept too: they lie in the embedding but past the tokenizer, which
exercises the exporters' padding of a vocabulary to the embedding's size. Tests feed token ids
directly (some from the tokenizer, some from the whole range), so every id is a valid row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tiny_models import make_tokenizer


@dataclass(frozen=True)
class RealShape:
    name: str
    published: dict  # config.json as published (num_hidden_layers is the real depth)
    layers: int = 1  # how many decoder layers the test model keeps
    notes: str = ""

    def config_json(self) -> dict:
        return {**self.published, "num_hidden_layers": self.layers}

    @property
    def tied(self) -> bool:
        return bool(self.published.get("tie_word_embeddings", False))

    def parameter_count(self) -> int:
        """Parameters of the cut model (what memory and time scale with)."""
        c = self.config_json()
        h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
        d = c.get("head_dim") or h // c["num_attention_heads"]
        q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        layer = h * (q + 2 * kv) + q * h + 3 * h * i
        return v * h * (1 if self.tied else 2) + self.layers * layer


def _llama(**values) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        **values,
    }


def _qwen2(max_position_embeddings: int, num_hidden_layers: int, **values) -> dict:
    """What Qwen2.5's small checkpoints share: the tied 151936-row table, rope 1e6, no sliding window used."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": max_position_embeddings,
        "max_window_layers": num_hidden_layers,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "initializer_range": 0.02,
        "max_position_embeddings": max_position_embeddings,
        "num_hidden_layers": num_hidden_layers,
        **values,
    }


SMOLLM2_135M = RealShape(
    "SmolLM2-135M",
    _llama(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=30,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.041666666666666664,
    ),
    layers=2,
    notes="576 wide: no multiple of the K-quants' 256; 9 heads over 3 KV heads",
)

SMOLLM2_360M = RealShape(
    "SmolLM2-360M",
    _llama(
        hidden_size=960,
        intermediate_size=2560,
        num_attention_heads=15,
        num_key_value_heads=5,
        num_hidden_layers=32,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    ),
    layers=2,
    notes="960 wide: no multiple of 256; 15 heads",
)

QWEN25_05B = RealShape(
    "Qwen2.5-0.5B",
    _qwen2(
        hidden_size=896,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        num_hidden_layers=24,
        max_position_embeddings=32768,
    ),
    notes="896 wide (3.5 x 256), q/k/v biases, 7:1 GQA, tied 151936-row table",
)

QWEN25_15B = RealShape(
    "Qwen2.5-1.5B",
    _qwen2(
        hidden_size=1536,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        num_hidden_layers=28,
        max_position_embeddings=131072,
    ),
    notes="head_dim 128, 6:1 GQA, 131072 positions",
)

LLAMA32_1B = RealShape(
    "Llama-3.2-1B",
    _llama(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=16,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    notes="llama3 rope scaling (factor 32), explicit head_dim, tied 128256-row table",
)

TINYLLAMA_11B = RealShape(
    "TinyLlama-1.1B",
    _llama(
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_hidden_layers=22,
        vocab_size=32000,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    ),
    notes="8:1 GQA, untied head",
)

MISTRAL_7B = RealShape(
    "Mistral-7B",
    {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
        "sliding_window": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
    },
    notes="Mistral-7B-v0.1: head_dim 128, sliding window 4096, ~0.5B parameters in one layer",
)

REAL_SHAPES = {
    s.name: s
    for s in (SMOLLM2_135M, SMOLLM2_360M, QWEN25_05B, QWEN25_15B, LLAMA32_1B, TINYLLAMA_11B, MISTRAL_7B)
}

# Not a published checkpoint: SmolLM2-135M's widths with a head size decoupled from hidden / heads
# (9 x 128 = 1152 query columns on a 576-wide model), as Qwen3 and Mistral-Nemo configs set it.
# None of the checkpoints above has head_dim != hidden_size / num_attention_heads.
DECOUPLED_HEAD_DIM = RealShape(
    "SmolLM2-135M-head_dim-128",
    {**SMOLLM2_135M.published, "head_dim": 128},
    notes="not published: head_dim 128 != 576 / 9",
)


def make_real_model_dir(out_dir: Path, shape: RealShape, seed: int = 0) -> Path:
    """config.json, model.safetensors (random bf16) and the tiny tokenizer for ``shape``."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out_dir)
    config = shape.config_json()
    (out_dir / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(name, size, config["initializer_range"], generator)
        for name, size in hf_tensor_shapes(out_dir).items()
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def hf_tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensor names and shapes as transformers builds them from config.json (on the
    meta device: nothing allocated), so a config transformers would reject fails here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = {"lm_head.weight"} if config.tie_word_embeddings else set()
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in skip}


def _random_tensor(name: str, size: tuple[int, ...], std: float, generator):
    """Linears and embeddings ~ N(0, initializer_range) as transformers initialises them; norms near 1
    and biases near 0 but not exactly (exact ones would hide a norm or bias that is read wrong)."""
    import torch

    noise = torch.randn(size, generator=generator, dtype=torch.float32)
    if "norm" in name:
        values = 1.0 + 0.1 * noise
    elif name.endswith(".bias"):
        values = 0.1 * noise
    else:
        values = std * noise
    return values.to(torch.bfloat16)
