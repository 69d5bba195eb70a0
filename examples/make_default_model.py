"""Make the tiny base model shipped in edge_lora/assets/default_model, from nothing.

Reproducible end to end: the script generates its own corpus (no download, no third-party text),
trains a byte-level BPE tokenizer on it with `tokenizers`, and pretrains a small Llama from
scratch with edge-lora's own PyTorch model. A few minutes on a 2-core CPU.

The corpus teaches what the quickstart adapters build on: letters spelled out one per token,
copying, spelling and joining words, first/last letters, single-letter facts (the next letter, the
mirror letter a <-> z), and plain sentences of made-up words. It never applies a letter fact to a
whole word, which is what the quickstart tasks ask (shift every letter, mirror every letter): the
base scores ~0 on them and a LoRA adapter has to teach the composition.

    python examples/make_default_model.py --out edge_lora/assets/default_model --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_lora.app.quickstart.tasks import LETTERS, random_word, spell  # noqa: E402
from edge_lora.config import ModelConfig  # noqa: E402

EOS = "<|endoftext|>"
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "to",
    "vi",
    "be",
    "da",
    "fu",
    "go",
    "hi",
    "ja",
    "po",
    "ze",
    "qu",
    "wy",
    "xi",
]
COMMON = [
    "the",
    "a",
    "and",
    "of",
    "to",
    "in",
    "is",
    "on",
    "red",
    "big",
    "old",
    "new",
    "fox",
    "cat",
    "dog",
    "sun",
    "sees",
    "has",
]


def corpus_line(rng: random.Random) -> str:
    """One training line; mostly spelled-out letter skills (copying is the circuit the adapters reuse)."""
    word = random_word(rng, 3, 6)
    kind = rng.random()
    if kind < 0.35:
        return f"copy: {spell(word)} = {spell(word)}"
    if kind < 0.45:
        return f"spell: {word} = {spell(word)}"
    if kind < 0.52:
        return f"join: {spell(word)} = {word}"
    if kind < 0.58:
        return f"first: {spell(word)} = {word[0]}"
    if kind < 0.64:
        return f"last: {spell(word)} = {word[-1]}"
    if kind < 0.72:  # letter facts, one letter at a time: the alphabet's order and its mirror image
        letter = rng.randrange(26)
        return f"next: {LETTERS[letter]} = {LETTERS[(letter + 1) % 26]}"
    if kind < 0.80:
        letter = rng.randrange(26)
        return f"flip: {LETTERS[letter]} = {LETTERS[25 - letter]}"
    if kind < 0.85:
        start = rng.randrange(26)
        return "letters: " + spell("".join(LETTERS[(start + i) % 26] for i in range(rng.randint(4, 8))))
    words = [
        rng.choice(COMMON)
        if rng.random() < 0.5
        else "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
        for _ in range(rng.randint(4, 9))
    ]
    return " ".join(words) + "."


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [corpus_line(rng) for _ in range(n)]


def train_tokenizer(lines: list[str], out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(lines, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": EOS,
                "pad_token": EOS,
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 128,
            },
            indent=2,
        )
        + "\n"
    )
    return tok.get_vocab_size()


def model_config(vocab_size: int, args) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=[0],
    )


def pretrain(config: ModelConfig, tokenizer_path: Path, lines: list[str], args):
    import torch
    from tokenizers import Tokenizer

    from edge_lora.train.model import CausalLM

    torch.manual_seed(args.seed)
    tok = Tokenizer.from_file(str(tokenizer_path))
    seqs = [ids + tok.encode("\n").ids for ids in (e.ids for e in tok.encode_batch(lines))]
    model = CausalLM(config)
    with torch.no_grad():  # GPT-2 style small init keeps the early steps stable
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    rng = random.Random(args.seed)
    start = time.time()
    for step in range(args.steps):
        batch = [seqs[rng.randrange(len(seqs))] for _ in range(args.batch)]
        width = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        logits = model(ids)  # right padding: causal attention never looks at it
        loss_mask = mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][loss_mask], ids[:, 1:][loss_mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    return model


def save(model, config: ModelConfig, out: Path) -> None:
    import numpy as np

    from edge_lora.safetensors_file import save_tensors

    tensors = {
        name: p.detach().float().numpy().astype(np.float16)
        for name, p in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight") and "rotary" not in name
    }
    save_tensors(out / "model.safetensors", tensors, {"format": "pt"})
    (out / "config.json").write_text(
        json.dumps({**config.to_hf_dict(), "torch_dtype": "float16"}, indent=2) + "\n"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "edge_lora/assets/default_model"
    )
    parser.add_argument("--lines", type=int, default=60000)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)  # 1 = bit-reproducible on any machine
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = corpus(args.lines, args.seed)
    vocab = train_tokenizer(lines, args.out, args.vocab)
    config = model_config(vocab, args)
    model = pretrain(config, args.out / "tokenizer.json", lines, args)
    save(model, config, args.out)
    print(f"wrote {args.out} (vocab {vocab}, hidden {args.hidden}, {args.layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
