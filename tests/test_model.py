"""Our PyTorch model against transformers: same weights, same logits (fp32, within 1e-4)."""

import pytest
import torch
from tiny_models import load_hf

from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.train.model import CausalLM


def test_logits_match_transformers(model_dirs, family):
    ours = CausalLM.from_model_dir(model_dirs[family]).eval()
    ref = load_hf(model_dirs[family])
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))  # longer than Mistral's window of 16
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    print(f"{family}: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < 1e-4


def test_padding_mask_matches_transformers(model_dirs):
    ours = CausalLM.from_model_dir(model_dirs["qwen2"]).eval()
    ref = load_hf(model_dirs["qwen2"])
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        a, b = ours(ids, mask), ref(ids, attention_mask=mask).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max().item() < 1e-4


def test_config_reads_family_details(model_dirs):
    q = ModelConfig.from_model_dir(model_dirs["qwen2"])
    assert q.attention_bias and not q.o_proj_bias and q.tie_word_embeddings
    l3 = ModelConfig.from_model_dir(model_dirs["llama3"])
    assert l3.rope_scaling["rope_type"] == "llama3" and l3.rope_theta == 500000.0
    m = ModelConfig.from_model_dir(model_dirs["mistral"])
    assert m.sliding_window == 16 and m.num_key_value_heads == 2


def test_unknown_keys_tolerated_and_old_style_rope():
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 1e4,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "some_future_key": [1, 2],
    }
    c = ModelConfig.from_dict(raw)
    assert (
        c.num_key_value_heads == 2
        and c.head_dim == 4
        and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    )


def test_unsupported_architecture_lists_supported():
    with pytest.raises(EdgeLoraError, match="Qwen2ForCausalLM"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]}, path="x/config.json")


def test_sharded_checkpoint_loads(tmp_path, model_dirs):
    ref = load_hf(model_dirs["llama"])
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((model_dirs["llama"] / f).read_bytes())
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = CausalLM.from_model_dir(tmp_path).eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 10))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() < 1e-4
