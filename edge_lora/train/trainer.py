"""The training loop: data -> model (+ quantized base, LoRA, new tokens) -> AdamW -> adapter file.

Read it top to bottom: :func:`train` builds everything, then runs ``steps`` optimizer steps. Step
``s`` always trains on the same examples (:class:`~.data.StepSampler`), the loss is the mean over
every target token of the global batch (all micro-batches of all ranks), so one process with
batch B equals N processes with batch B/N, and a resumed run equals an uninterrupted one.

The pieces live beside it: devices and processes (:mod:`.devices`), the trainable model
(:mod:`.trainable_model`), AdamW and its schedule (:mod:`.optimizer`), evaluation and early
stopping (:mod:`.evaluation`), saving and resuming a run (:mod:`.run_checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from torch import nn

from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.train import checkpoint as ckpt
from edge_lora.train.config import TrainConfig
from edge_lora.train.data import (
    Example,
    Formatter,
    StepSampler,
    build_examples,
    collate,
    read_jsonl,
    split_eval,
)
from edge_lora.train.devices import Dist, data_parallel, release_freed_memory_promptly, setup_distributed
from edge_lora.train.dtype_probe import DtypeChoice, measure_dtypes, to_dtype
from edge_lora.train.evaluation import Evaluator
from edge_lora.train.lora import to_adapter
from edge_lora.train.model import CausalLM
from edge_lora.train.optimizer import build_optimizer, set_learning_rate
from edge_lora.train.progress import MetricsLog, Progress
from edge_lora.train.run_checkpoint import resume_run, save_run_checkpoint
from edge_lora.train.tokens import attach_new_tokens
from edge_lora.train.trainable_model import TrainModule, build_model, lora_config


def train(cfg: TrainConfig) -> dict:
    cfg.validate()
    release_freed_memory_promptly()
    try:
        return _train(cfg)
    finally:  # flush-to-zero is process-wide (numpy too): leave the caller's floating point as it was
        torch.set_flush_denormal(False)


def _train(cfg: TrainConfig) -> dict:
    dist = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    md = ModelDir(cfg.model)
    fingerprint = md.fingerprint
    formatter = Formatter(md, cfg.add_tokens)
    invocation = formatter.invocation_tokens(cfg.alora_invocation) if cfg.alora_invocation else []
    # every line checked before anything else
    train_ex, eval_ex, stats = load_examples(cfg, formatter, invocation)
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world
    sampler = StepSampler(len(train_ex), global_batch, cfg.seed)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))

    torch.manual_seed(cfg.seed)  # same LoRA initialisation on every rank
    model = build_model(md, cfg, dist.device, invocation).to(dist.device)
    module = TrainModule(model)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(params, cfg)

    state = {"best_eval": None, "bad_evals": 0, "tokens_seen": 0, "stopped_early": False, "last_eval": None}
    best: dict[str, torch.Tensor] | None = None
    start = 0
    torch.manual_seed(cfg.seed * 1_000_003 + dist.rank)  # dropout masks differ per rank
    if cfg.resume:
        start, best = resume_run(cfg, params, optimizer, state, dist)
    choice = settle_compute_dtype(model, module, dist, [train_ex[i] for i in sampler.step(start)], cfg, state)
    runner = data_parallel(module, dist)  # after the dtype probe: its passes bypass DDP's gradient hooks

    log = MetricsLog(cfg.log_path if dist.main else None)
    bar = Progress(total, start, enabled=cfg.progress and dist.main)
    if dist.main:
        _announce_start(cfg, dist, bar, log, start, total, global_batch, train_ex, eval_ex, stats, params)
        bar.message(choice.describe())
        log.write({"event": "compute_dtype", **choice.record()})
    pad_id = formatter.eos_id or 0
    evaluator = Evaluator(module, eval_ex, cfg, dist, pad_id, log, bar)

    model.train()
    t_step = time.perf_counter()
    for step in range(start, total):
        ckpt.test_hook(f"step-{step}")
        set_learning_rate(optimizer, cfg, step, total)
        batch = [train_ex[i] for i in sampler.step(step)]
        loss, grad_norm = train_step(runner, optimizer, params, batch, cfg, dist, pad_id, step)
        n_tokens = sum(len(ex.ids) for ex in batch)
        state["tokens_seen"] += n_tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            step_s = time.perf_counter() - t_step
            lr = optimizer.param_groups[0]["lr"]
            speed = bar.update(done, loss, n_tokens, lr)
            log.write(_train_record(done, loss, lr, grad_norm, state, sampler, step_s, speed))
        else:
            bar.tokens += n_tokens
        t_step = time.perf_counter()

        stop = False
        if eval_ex and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            best, stop = evaluator(params, state, best, done)
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or stop):
            save_run_checkpoint(cfg, done, params, optimizer, state, best, dist)
        if stop:
            state["stopped_early"] = True
            bar.message(
                f"early stopping at step {done}: no eval improvement in {cfg.patience} evaluations "
                f"(best {state['best_eval']:.4f})"
            )
            break
    else:
        done = total

    if eval_ex and not state["stopped_early"]:
        best, _ = evaluator(params, state, best, done, final=True)
    if best is not None and cfg.eval_every:  # periodic evaluation: keep the best weights
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best[name].to(p.device, p.dtype))
    bar.close()

    summary = _summary(cfg, done, train_ex, eval_ex, state)
    if dist.main:
        save_adapter(model, cfg, fingerprint, formatter, summary)
        log.write({"event": "done", **summary})
        bar.message(f"wrote {cfg.out}")
    if dist.world > 1:
        torch.distributed.barrier()
    return summary


def load_examples(
    cfg: TrainConfig, formatter: Formatter, invocation: list[int] | None = None
) -> tuple[list[Example], list[Example], dict]:
    """``(train, eval, stats)``: the tokenized examples (eval carved off train without an eval file)
    and the truncation statistics of the training data. With aLoRA ``invocation`` tokens, every
    example (eval file too) must contain them before a target token (``data.build_examples``)."""
    train_records = read_jsonl(cfg.data)
    eval_records = read_jsonl(cfg.eval_data) if cfg.eval_data else None
    train_ex, stats = build_examples(
        train_records, formatter, cfg.seq_len, packing=cfg.packing, invocation=invocation, path=cfg.data
    )
    if eval_records is not None:
        eval_ex, _ = build_examples(
            eval_records,
            formatter,
            cfg.seq_len,
            packing=cfg.packing,
            invocation=invocation,
            path=cfg.eval_data,
        )
    else:
        train_ex, eval_ex = split_eval(train_ex, cfg.eval_split, cfg.seed)
    if cfg.max_eval_samples:
        eval_ex = eval_ex[: cfg.max_eval_samples]
    if not train_ex:
        raise EdgeLoraError(
            "no training example has a target token left after truncation",
            path=cfg.data,
            hint="raise --seq-len or shorten the prompts",
        )
    return train_ex, eval_ex, stats


def settle_compute_dtype(
    model: CausalLM, module: TrainModule, dist: Dist, batch: list[Example], cfg: TrainConfig, state: dict
) -> DtypeChoice:
    """The run's compute dtype: as built, or (``auto`` on native bf16) the one a resumed run measured,
    or measured now on one micro-batch of the first step (:mod:`.dtype_probe`); kept in ``state`` so
    a resume continues in it."""
    if model.compute_dtype is not None:
        choice = DtypeChoice(model.compute_dtype, how="as asked" if cfg.compute_dtype != "auto" else "rule")
    elif state.get("compute_dtype") in ("float32", "bfloat16"):
        choice = DtypeChoice(getattr(torch, state["compute_dtype"]), how="as the resumed run measured")
        if choice.dtype == torch.bfloat16:
            to_dtype(model, torch.bfloat16)
    else:
        ids, targets, segments = collate(batch[: cfg.batch_size], pad_id=0)
        ids, targets = ids.to(dist.device), targets.to(dist.device)
        segments = None if segments is None else segments.to(dist.device)

        def run_pass(bf16: bool) -> None:
            module.bf16 = bf16
            module(ids, targets, segments).backward()

        choice = measure_dtypes(model, run_pass, dist, dist.device)
    model.compute_dtype = choice.dtype
    module.bf16 = choice.dtype == torch.bfloat16
    state["compute_dtype"] = str(choice.dtype).removeprefix("torch.")
    return choice


def train_step(
    runner: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: dict[str, nn.Parameter],
    batch: list[Example],
    cfg: TrainConfig,
    dist: Dist,
    pad_id: int,
    step: int,
) -> tuple[float, float | None]:
    """One optimizer step on the global batch (this rank runs its share of each micro-batch);
    returns ``(mean loss per target token over the global batch, gradient norm before clipping)``."""
    n_targets = sum(ex.targets for ex in batch)
    local_loss = 0.0
    for micro in range(cfg.grad_accum):
        lo = (micro * dist.world + dist.rank) * cfg.batch_size
        ids, targets, segments = collate(batch[lo : lo + cfg.batch_size], pad_id)
        ids, targets = ids.to(dist.device), targets.to(dist.device)
        segments = None if segments is None else segments.to(dist.device)
        last = dist.world == 1 or micro == cfg.grad_accum - 1  # DDP syncs gradients on the last one only
        with contextlib.nullcontext() if last else runner.no_sync():
            loss_sum = runner(ids, targets, segments)
            (loss_sum * (dist.world / n_targets)).backward()
        local_loss += loss_sum.item()
    grad_norm = None
    if cfg.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    (loss_total,) = dist.all_sum([local_loss])
    loss = loss_total / n_targets
    if not math.isfinite(loss):
        raise EdgeLoraError(
            f"loss became {loss} at step {step + 1}", hint="lower --lr, or use --max-grad-norm 1.0"
        )
    return loss, grad_norm


def _announce_start(
    cfg: TrainConfig,
    dist: Dist,
    bar: Progress,
    log: MetricsLog,
    start: int,
    total: int,
    global_batch: int,
    train_ex: list[Example],
    eval_ex: list[Example],
    stats: dict,
    params: dict[str, nn.Parameter],
) -> None:
    """The first line of a run (and its ``start`` record), or the note that it resumes."""
    if start > 0:
        bar.message(f"edge-lora train: resuming at step {start} of {total}")
        return
    n_train = sum(p.numel() for p in params.values())
    bar.message(
        f"edge-lora train: {len(train_ex)} train / {len(eval_ex)} eval examples "
        f"({stats['truncated']} truncated, {stats['dropped']} dropped), {n_train:,} trainable parameters, "
        f"{total} steps of {global_batch} sequences, "
        f"device {dist.device}{f' x{dist.world}' if dist.world > 1 else ''}, base {cfg.base_quant}"
    )
    if stats.get("before_invocation"):
        bar.message(
            f"warning: {stats['before_invocation']} of {len(train_ex)} training examples have target tokens "
            "before the aLoRA invocation: the model is the base there, so they train nothing "
            "(prompt/completion data keeps the loss on the response only)"
        )
    log.write(
        {
            "event": "start",
            "train_examples": len(train_ex),
            "eval_examples": len(eval_ex),
            "trainable_parameters": n_train,
            "steps": total,
            "global_batch": global_batch,
            "world_size": dist.world,
            "config": cfg.to_dict(),
        }
    )


def _train_record(
    done: int,
    loss: float,
    lr: float,
    grad_norm: float | None,
    state: dict,
    sampler: StepSampler,
    step_s: float,
    speed: dict,
) -> dict:
    return {
        "event": "train",
        "step": done,
        "loss": round(loss, 6),
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": state["tokens_seen"],
        "epoch": round(sampler.epoch_of(done), 4),
        "step_s": round(step_s, 4),
        **speed,
    }


def _summary(
    cfg: TrainConfig, done: int, train_ex: list[Example], eval_ex: list[Example], state: dict
) -> dict:
    return {
        "steps": done,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "best_eval_loss": state["best_eval"],
        "last_eval_loss": state["last_eval"],
        "stopped_early": state["stopped_early"],
        "tokens_seen": state["tokens_seen"],
        "out": str(cfg.out),
    }


def save_adapter(
    model: CausalLM, cfg: TrainConfig, fingerprint: str, formatter: Formatter, summary: dict
) -> None:
    extra = {
        "trainer": "edge-lora",
        "settings": {
            k: v
            for k, v in cfg.to_dict().items()
            if k not in ("model", "data", "eval_data", "out", "log_file", "checkpoint_dir", "resume")
        },
        "data": Path(cfg.data).name,
        **({"alora_invocation": cfg.alora_invocation} if cfg.alora_invocation else {}),
        "result": {k: summary[k] for k in ("steps", "best_eval_loss", "last_eval_loss", "stopped_early")},
    }
    adapter = to_adapter(model, lora_config(cfg), fingerprint, extra=extra)
    attach_new_tokens(adapter, model, list(cfg.add_tokens))
    adapter.save(cfg.out)
