"""Train one quickstart adapter in process, and score a model on a task on the host (PyTorch).

The examples are a few hundred short prompt/answer pairs held in memory, so a tight loop over
the trainer's LoRA layers (edge_lora.train.lora) is all it takes: loss on the answer tokens only,
AdamW, a short warm-up and a linear decay. The host score is the fp32 reference that the
exported backends are compared with.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from edge_lora.app.quickstart.tasks import END, StyleTask, Task, exact_match

if TYPE_CHECKING:  # torch is imported where it is used: the quickstart's device half runs without it
    import torch

    from edge_lora.model_dir import ModelDir
    from edge_lora.train.data import Formatter
    from edge_lora.train.model import CausalLM


@dataclass
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"
    train_items: int = 2000
    seed: int = 0
    threads: int = 0  # 0 = leave torch's default


@dataclass
class FinetuneResult:
    path: Path
    seconds: float
    final_loss: float


def _encode_pairs(tokenizer: Formatter, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(ids of prompt + answer + END, number of prompt tokens) per pair; the prompt is encoded alone,
    as at inference."""
    out = []
    for prompt, target in pairs:
        p = tokenizer.encode_text(prompt)
        a = tokenizer.encode_text(target + END)
        out.append((p + a, len(p)))
    return out


def train_adapter(
    model_dir: str | os.PathLike,
    task: Task | StyleTask,
    out_path: Path,
    config: FinetuneConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Train ``task``'s adapter: LoRA on its target modules, plus the rows of the tokens it adds."""
    import torch

    from edge_lora.model_dir import ModelDir
    from edge_lora.train.data import Formatter
    from edge_lora.train.lora import LoraConfig, apply_lora, to_adapter
    from edge_lora.train.model import CausalLM
    from edge_lora.train.tokens import add_new_tokens, attach_new_tokens

    config = config or FinetuneConfig()
    start = time.perf_counter()
    md = ModelDir(model_dir)
    _set_threads(torch, config.threads, md)
    torch.manual_seed(config.seed)
    model = CausalLM.from_model_dir(md)
    layers = md.config.num_hidden_layers
    targets = task.target_modules(layers) if config.targets == "all-linear" else config.targets
    lora = LoraConfig(rank=config.rank, alpha=config.alpha, targets=targets)
    apply_lora(model, lora)
    add_new_tokens(model, len(task.new_tokens))
    tokenizer = Formatter(md, list(task.new_tokens))
    data = _encode_pairs(tokenizer, task.examples(config.train_items, "train", seed=config.seed))
    loss_value = _fit(model, data, config, log=lambda text: log and log(f"  {task.name}: {text}"))
    extra = {"trainer": "edge-lora quickstart", "task": task.name, "steps": config.steps, "lr": config.lr}
    adapter = to_adapter(model, lora, md.fingerprint, extra=extra)
    attach_new_tokens(adapter, model, list(task.new_tokens))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    adapter.save(out_path)
    return FinetuneResult(out_path, time.perf_counter() - start, loss_value)


def _fit(
    model: CausalLM, data: list[tuple[list[int], int]], config: FinetuneConfig, log: Callable[[str], None]
) -> float:
    """AdamW with a short warm-up and a linear decay on random batches; returns the last loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / config.steps)
    )
    rng = random.Random(config.seed)
    model.train()
    loss_value = float("nan")
    for step in range(config.steps):
        ids, labels = _batch([data[rng.randrange(len(data))] for _ in range(config.batch_size)])
        logits = _logits(model, ids)  # right padding: causal attention never reads it
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 50 == 0 or step == config.steps - 1:
            log(f"step {step + 1}/{config.steps} loss {loss_value:.4f}")
    return loss_value


def _batch(batch: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels that score only the answer tokens (-100 elsewhere)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, labels


def _logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits over the base vocabulary and the rows of any tokens the adapter adds."""
    import torch

    from edge_lora.train.tokens import head_weights

    hidden = model.hidden_states(ids)
    weight, extra = head_weights(model)
    logits = hidden @ weight.T
    return logits if extra is None else torch.cat([logits, hidden @ extra.T], dim=-1)


def _set_threads(torch: ModuleType, threads: int, md: ModelDir) -> None:
    """A tiny model gains nothing from a second thread, and on a busy CPU OpenMP's spinning makes it
    far slower."""
    if threads:
        torch.set_num_threads(threads)
    elif md.config.hidden_size <= 256:
        torch.set_num_threads(1)


def host_score(
    model_dir: str | os.PathLike,
    items: list[tuple[str, str]],
    adapter_path: Path | None = None,
    max_new_tokens: int = 8,
) -> float:
    """Exact-match percent of the fp32 PyTorch model (with an adapter or without), greedy."""
    import torch

    from edge_lora.adapter import Adapter
    from edge_lora.model_dir import ModelDir
    from edge_lora.train.data import Formatter
    from edge_lora.train.lora import load_adapter_into
    from edge_lora.train.model import CausalLM
    from edge_lora.train.tokens import load_new_tokens

    md = ModelDir(model_dir)
    _set_threads(torch, 0, md)
    model = CausalLM.from_model_dir(md)
    added: list[str] = []
    if adapter_path is not None:
        adapter = Adapter.load(adapter_path, base=md.config)
        load_adapter_into(model, adapter)
        load_new_tokens(model, adapter)
        added = adapter.added_tokens
    model.eval()
    tokenizer = Formatter(md, added)
    by_length: dict[int, list[int]] = {}
    prompts = [tokenizer.encode_text(p) for p, _ in items]
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    hits = 0
    with torch.no_grad():
        for indices in by_length.values():  # same-length prompts decode as one batch, no padding
            ids = torch.tensor([prompts[i] for i in indices])
            for _ in range(max_new_tokens):
                nxt = _logits(model, ids)[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], dim=1)
            for row, i in zip(ids.tolist(), indices):
                text = tokenizer.decode(row[len(prompts[i]) :])
                hits += exact_match(text, items[i][1])
    return 100.0 * hits / max(1, len(items))
