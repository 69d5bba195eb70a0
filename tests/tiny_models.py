"""Tiny random-weight models with the real config files of real families, built by transformers.

Nothing is downloaded: weights come from ``from_config`` with a fixed seed, the tokenizer is a
byte-level BPE trained here on a few lines of text.
"""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "smollm")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE id = 42;",
    "def add(a, b):\n    return a + b\n",
    "Grüße aus Köln! 東京 に 行きます 🙂",
    "edge-lora trains adapters on the host and runs them on the device.",
] * 20


def make_tokenizer(out_dir: Path, vocab_size: int = 320) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 512,
            }
        )
    )
    return tok.get_vocab_size()


def family_config(family: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        rms_norm_eps=1e-5,
    )
    common.update(overrides)
    if family == "llama":  # Llama 2 shape: untied, default rope
        return LlamaConfig(**common, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    if family == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }
        return LlamaConfig(
            **common, tie_word_embeddings=False, rope_scaling=rope, architectures=["LlamaForCausalLM"]
        )
    if family == "mistral":
        return MistralConfig(
            **common, sliding_window=16, tie_word_embeddings=False, architectures=["MistralForCausalLM"]
        )
    if family == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    if family == "smollm":
        return LlamaConfig(**common, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    raise ValueError(family)


def make_model_dir(out_dir: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and the tokenizer for a tiny model of ``family``."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out_dir)
    config = family_config(family, vocab, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; random ones test more
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_hf(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def make_model_dir_with_tokenizer(
    out_dir: Path, family: str, tokenizer_dir: Path, seed: int = 0, **overrides
) -> Path:
    """A tiny model of ``family`` around an existing tokenizer (tokenizer.json and its config files):
    vocab_size, BOS and EOS follow the tokenizer. Sizes stay tiny, since a real vocabulary is large."""
    import shutil

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, out_dir / name)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    special = json.loads((out_dir / "tokenizer_config.json").read_text())
    names = {key: _content(special.get(f"{key}_token")) for key in ("bos", "eos")}
    ids = {key: tok.token_to_id(name) if name else None for key, name in names.items()}
    sizes = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = family_config(
        family,
        max(tok.get_vocab(with_added_tokens=True).values()) + 1,
        **{**sizes, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], **overrides},
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        out_dir, safe_serialization=True
    )
    return out_dir


def _content(entry):
    return entry.get("content") if isinstance(entry, dict) else entry


def quick_train_config(tmp_path: Path, model_dir, data, **overrides):
    """A TrainConfig for a few steps of the real trainer on a tiny model (what the training tests share)."""
    from edge_lora.train.config import TrainConfig

    base = dict(
        model=str(model_dir),
        data=str(data),
        out=str(tmp_path / "adapter.safetensors"),
        steps=4,
        batch_size=4,
        seq_len=32,
        rank=4,
        alpha=8,
        lr=1e-2,
        progress=False,
        threads=1,
    )
    base.update(overrides)
    return TrainConfig.from_dict(base)
