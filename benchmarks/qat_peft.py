"""The PEFT side of the real-task training comparison (benchmarks.qat_bench), run as a child process.

A plain transformers + PEFT loop, written out here, on the very batches ``edge-lora train`` sees: the
same tokens and loss masks (our data pipeline's ``Formatter``), the same seeded batch order
(``StepSampler``), AdamW with the same rate, cosine schedule and gradient clipping, and a PEFT
``LoraConfig`` with the same rank, alpha and target modules. Saves a PEFT adapter folder and prints
one JSON line: wall time of the loop and of the whole process, steps, tokens.

    python -m benchmarks.qat_peft MODEL_DIR TRAIN.jsonl OUT_DIR --rank 8 --alpha 16 --lr 1e-3 \
        --steps 100 --batch 8 --seq-len 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qat_peft", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("out")
    for name, kind in (("rank", int), ("alpha", float), ("lr", float), ("steps", int), ("batch", int)):
        p.add_argument(f"--{name}", type=kind, required=True)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    return p


def _batches(args: argparse.Namespace) -> tuple[list, object]:
    from edge_lora.train.data import Formatter, StepSampler, build_examples, read_jsonl

    formatter = Formatter(args.model)
    examples, _ = build_examples(read_jsonl(args.data), formatter, args.seq_len)
    return examples, StepSampler(len(examples), args.batch, args.seed)


def _collate(examples: list) -> tuple:
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n] = torch.from_numpy(e.ids)
        mask[b, :n] = 1
        keep = torch.from_numpy(e.mask)
        labels[b, :n] = torch.where(keep, ids[b, :n], torch.full_like(ids[b, :n], -100))
    return ids, mask, labels


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = _parser().parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    examples, sampler = _batches(args)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))
    )
    model.train()
    loop_start, tokens, losses = time.perf_counter(), 0, []
    for step in range(args.steps):
        ids, mask, labels = _collate([examples[i] for i in sampler.step(step)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(mask.sum())
        losses.append(float(loss))
    loop_s = time.perf_counter() - loop_start
    model.save_pretrained(args.out)
    print(
        json.dumps(
            {
                "loop_s": loop_s,
                "process_s": time.perf_counter() - started,
                "steps": args.steps,
                "tokens": tokens,
                "first_loss": losses[0],
                "last_loss": sum(losses[-5:]) / len(losses[-5:]),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
