"""The training loop: data -> model (+ quantized base, LoRA, new tokens) -> AdamW -> adapter file.

Read it top to bottom: :func:`train` builds everything, then runs ``steps`` optimizer steps. Step
``s`` always trains on the same examples (:class:`~.data.StepSampler`), the loss is the mean over
every target token of the global batch (all micro-batches of all ranks), so one process with
batch B equals N processes with batch B/N, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.checkpoint  # noqa: F401  (model.gradient_checkpointing uses it)
from torch import nn

from edge_lora.errors import EdgeLoraError
from edge_lora.model_dir import ModelDir
from edge_lora.targets import linear_modules
from edge_lora.train import checkpoint as ckpt
from edge_lora.train.config import RESUME_FREE, TrainConfig
from edge_lora.train.data import Formatter, StepSampler, build_examples, collate, read_jsonl, split_eval
from edge_lora.train.lora import LoraConfig, _parent, apply_lora, to_adapter
from edge_lora.train.loss import linear_cross_entropy
from edge_lora.train.model import CausalLM
from edge_lora.train.progress import MetricsLog, Progress
from edge_lora.train.quant import QuantEmbedding, QuantLinear, TiedQuantHead, quant_bits
from edge_lora.train.tokens import add_new_tokens, attach_new_tokens, head_weights

# --- devices and processes ----------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise EdgeLoraError(
                "--device cuda but no CUDA device is visible", hint="use --device cpu or auto"
            )
        return torch.device("cuda", local_rank)
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EdgeLoraError("--device mps but MPS is not available", hint="use --device cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run at twice the fp32 rate or better."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "bf16" or (
        name == "auto"
        and (
            device.type == "cpu"
            and cpu_has_native_bf16()
            or device.type == "cuda"
            and torch.cuda.is_bf16_supported()
        )
    ):
        return torch.bfloat16
    return torch.float32


def setup_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if world > 1:
        if os.environ.get("MASTER_PORT") == "0":  # each worker would wait on its own random port forever
            raise EdgeLoraError(
                "torchrun --master_port=0 gives every worker port 0, so they never meet",
                hint="use torchrun --standalone (it picks a free port) or a fixed --master_port",
            )
        if device.type == "mps":
            raise EdgeLoraError(
                "data-parallel training is not supported on MPS", hint="use --device cpu or cuda"
            )
        if not torch.distributed.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def release_freed_memory_promptly() -> None:
    """Fix glibc's mmap threshold at 32 MiB (trim at 64 MiB) instead of letting it float.

    By default glibc raises its threshold after each large free, so ever larger blocks come from
    the heap and fragment it. Fixed at 1 MiB, every activation was a fresh mapping whose pages the
    kernel zeroed on first touch, each step (a quarter of an fp32 step on the SmolLM2-135M shape).
    At 32 MiB the per-layer activations are reused from the heap and only the loss's chunk-sized
    blocks are mapped: measured here, bf16 compute 327 -> 545 tok/s for 1.45 -> 1.74 GB peak RSS.
    No-op off glibc or with EDGE_LORA_DEFAULT_MALLOC=1. Also flushes denormals to zero.
    """
    import ctypes
    import ctypes.util
    import sys

    torch.set_flush_denormal(
        True
    )  # a peaked softmax underflows into denormals, which x86 computes ~10x slower
    if not sys.platform.startswith("linux") or os.environ.get("EDGE_LORA_DEFAULT_MALLOC") == "1":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# --- the model ------------------------------------------------------------------------------


def load_model(md: ModelDir, base_quant: str = "none", group_size: int = 0) -> CausalLM:
    """The base model in fp32, its decoder linear layers quantized while loading when asked
    (so the full-precision weights are never all in memory at once)."""
    config = md.config
    with torch.device("meta"):
        model = CausalLM(config)
    names = set(md.tensor_names())
    quantized = list(linear_modules(config)) if base_quant != "none" else []
    for name in quantized:
        parent, child = _parent(model, name)
        if f"{name}.weight" not in names:
            raise EdgeLoraError(
                f"weights are missing {name}.weight",
                path=md.path,
                hint="is this the model config.json describes?",
            )
        bias = md.read_float32(f"{name}.bias") if f"{name}.bias" in names else None
        setattr(
            parent,
            child,
            QuantLinear.from_weight(
                md.read_float32(f"{name}.weight"), bias, quant_bits(base_quant), group_size
            ),
        )
    quant_table = base_quant != "none" and config.tie_word_embeddings
    if (
        quant_table
    ):  # the tied table is the largest tensor of a small model: lookup and head both read it quantized
        table = QuantEmbedding.from_weight(
            md.read_float32("model.embed_tokens.weight"), quant_bits(base_quant), group_size
        )
        model.model.embed_tokens, model.lm_head = table, TiedQuantHead(table)
    for module_name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            full = f"{module_name}.{pname}" if module_name else pname
            if full == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if full not in names:
                raise EdgeLoraError(
                    f"weights are missing {full!r}",
                    path=md.path,
                    hint="is this the model config.json describes?",
                )
            arr = md.read_float32(full)
            if tuple(arr.shape) != tuple(p.shape):
                raise EdgeLoraError(
                    f"tensor {full!r} has shape {list(arr.shape)}, config.json implies {list(p.shape)}",
                    path=md.path,
                )
            setattr(module, pname, nn.Parameter(torch.from_numpy(arr), requires_grad=False))
    if config.tie_word_embeddings and not quant_table:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary.inv_freq = torch.tensor(config.rope_inv_freq(), dtype=torch.float32)
    model.model_dir = md
    md.release()  # the checkpoint's memory maps are no longer needed
    return model


class TrainModule(nn.Module):
    """``forward(ids, targets) -> summed token loss``; what DDP wraps. A model stored in bf16 runs
    under bf16 autocast (the fp32 LoRA weights are cast per use; the loss is summed in fp32)."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model
        self.bf16 = model.model.norm.weight.dtype == torch.bfloat16

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            # right padding + causal attention: no mask needed, unless rows pack several examples
            hidden = self.model.hidden_states(ids, segments=segments)
            picked = targets[:, 1:]
            weight, extra = head_weights(self.model)
            return linear_cross_entropy(hidden[:, :-1][picked], ids[:, 1:][picked], weight, extra)


def lora_config(cfg: TrainConfig) -> LoraConfig:
    return LoraConfig(
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        targets=cfg.targets,
        rslora=cfg.rslora,
        dora=cfg.dora,
    )


def build_model(md: ModelDir, cfg: TrainConfig, device: torch.device | None = None) -> CausalLM:
    model = load_model(md, cfg.base_quant, cfg.quant_group_size)
    apply_lora(model, lora_config(cfg))  # freezes everything, then adds trainable A/B (and magnitudes)
    add_new_tokens(model, len(cfg.add_tokens))
    if resolve_compute_dtype(cfg.compute_dtype, device or resolve_device(cfg.device)) == torch.bfloat16:
        with torch.no_grad():  # the frozen base once in bf16: no per-step casts, half the memory
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
            for m in model.modules():
                if isinstance(m, QuantEmbedding):
                    m.dtype = torch.bfloat16
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def optimizer_groups(params: dict[str, nn.Parameter], cfg: TrainConfig) -> list[dict]:
    groups: dict[tuple, list] = {}
    for name, p in params.items():
        is_b = name.endswith("lora_B")
        scale = cfg.lora_plus_ratio if (is_b and cfg.lora_plus_ratio > 0) else 1.0
        decay = cfg.weight_decay if name.endswith(("lora_A", "lora_B")) else 0.0
        groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": decay}
        for (scale, decay), ps in groups.items()
    ]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --- the run --------------------------------------------------------------------------------


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

    # data: every line checked before anything else happens
    train_records = read_jsonl(cfg.data)
    eval_records = read_jsonl(cfg.eval_data) if cfg.eval_data else None
    train_ex, stats = build_examples(train_records, formatter, cfg.seq_len, packing=cfg.packing)
    if eval_records is not None:
        eval_ex, _ = build_examples(eval_records, formatter, cfg.seq_len, packing=cfg.packing)
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
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world
    sampler = StepSampler(len(train_ex), global_batch, cfg.seed)
    total = cfg.steps or max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))

    torch.manual_seed(cfg.seed)  # same LoRA initialisation on every rank
    model = build_model(md, cfg, dist.device).to(dist.device)
    module = TrainModule(model)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(
        optimizer_groups(params, cfg), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps
    )
    runner = module
    if dist.world > 1:
        runner = nn.parallel.DistributedDataParallel(
            module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
        )

    state = {"best_eval": None, "bad_evals": 0, "tokens_seen": 0, "stopped_early": False, "last_eval": None}
    best: dict[str, torch.Tensor] | None = None
    start = 0
    torch.manual_seed(cfg.seed * 1_000_003 + dist.rank)  # dropout masks differ per rank
    if cfg.resume:
        start, best = _resume(cfg, params, optimizer, state, dist)

    log = MetricsLog(cfg.log_path if dist.main else None)
    bar = Progress(total, start, enabled=cfg.progress and dist.main)
    if dist.main and start > 0:
        bar.message(f"edge-lora train: resuming at step {start} of {total}")
    if dist.main and start == 0:
        n_train = sum(p.numel() for p in params.values())
        bar.message(
            f"edge-lora train: {len(train_ex)} train / {len(eval_ex)} eval examples ({stats['truncated']} truncated, "
            f"{stats['dropped']} dropped), {n_train:,} trainable parameters, {total} steps of {global_batch} sequences, "
            f"device {dist.device}{f' x{dist.world}' if dist.world > 1 else ''}, base {cfg.base_quant}"
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

    pad_id = formatter.eos_id or 0
    model.train()
    step = start
    t_step = time.perf_counter()
    for step in range(start, total):
        ckpt.test_hook(f"step-{step}")
        factor = lr_factor(step, total, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * group["lr_scale"] * factor
        idx = sampler.step(step)
        n_targets = sum(train_ex[i].targets for i in idx)
        n_tokens = sum(len(train_ex[i].ids) for i in idx)
        local_loss = 0.0
        for micro in range(cfg.grad_accum):
            lo = (micro * dist.world + dist.rank) * cfg.batch_size
            ids, targets, segments = collate([train_ex[i] for i in idx[lo : lo + cfg.batch_size]], pad_id)
            ids, targets = ids.to(dist.device), targets.to(dist.device)
            segments = None if segments is None else segments.to(dist.device)
            sync = (
                contextlib.nullcontext()
                if (dist.world == 1 or micro == cfg.grad_accum - 1)
                else runner.no_sync()
            )
            with sync:
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
        state["tokens_seen"] += n_tokens
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            now = time.perf_counter()
            speed = bar.update(done, loss, n_tokens, optimizer.param_groups[0]["lr"])
            log.write(
                {
                    "event": "train",
                    "step": done,
                    "loss": round(loss, 6),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "tokens": state["tokens_seen"],
                    "epoch": round(sampler.epoch_of(done), 4),
                    "step_s": round(now - t_step, 4),
                    **speed,
                }
            )
        else:
            bar.tokens += n_tokens
        t_step = time.perf_counter()

        stop = False
        if eval_ex and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
            best, stop = _evaluate_and_track(
                module, eval_ex, cfg, dist, pad_id, params, state, best, done, log, bar
            )
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or stop):
            _checkpoint(cfg, done, params, optimizer, state, best, dist)
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
        best, _ = _evaluate_and_track(
            module, eval_ex, cfg, dist, pad_id, params, state, best, done, log, bar, final=True
        )
    if best is not None and cfg.eval_every:  # periodic evaluation: keep the best weights
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best[name].to(p.device, p.dtype))
    bar.close()

    summary = {
        "steps": done,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "best_eval_loss": state["best_eval"],
        "last_eval_loss": state["last_eval"],
        "stopped_early": state["stopped_early"],
        "tokens_seen": state["tokens_seen"],
        "out": str(cfg.out),
    }
    if dist.main:
        save_adapter(model, cfg, fingerprint, formatter, summary)
        log.write({"event": "done", **summary})
        bar.message(f"wrote {cfg.out}")
    if dist.world > 1:
        torch.distributed.barrier()
    return summary


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
        "result": {k: summary[k] for k in ("steps", "best_eval_loss", "last_eval_loss", "stopped_early")},
    }
    adapter = to_adapter(model, lora_config(cfg), fingerprint, extra=extra)
    attach_new_tokens(adapter, model, list(cfg.add_tokens))
    adapter.save(cfg.out)


@torch.no_grad()
def evaluate(module: TrainModule, examples, batch_size: int, dist: Dist, pad_id: int) -> float:
    was_training = module.training
    module.eval()
    loss = count = 0.0
    for k, start in enumerate(range(0, len(examples), batch_size)):
        if k % dist.world != dist.rank:
            continue
        batch = examples[start : start + batch_size]
        ids, targets, segments = collate(batch, pad_id)
        loss += module(
            ids.to(dist.device),
            targets.to(dist.device),
            None if segments is None else segments.to(dist.device),
        ).item()
        count += float(targets[:, 1:].sum())
    module.train(was_training)
    loss, count = dist.all_sum([loss, count])
    return loss / max(count, 1.0)


def _evaluate_and_track(module, eval_ex, cfg, dist, pad_id, params, state, best, step, log, bar, final=False):
    loss = evaluate(module, eval_ex, cfg.batch_size, dist, pad_id)
    state["last_eval"] = loss
    improved = state["best_eval"] is None or loss < state["best_eval"] - cfg.min_delta
    if improved:
        state["best_eval"], state["bad_evals"] = loss, 0
        best = {n: p.detach().clone() for n, p in params.items()}
    else:
        state["bad_evals"] += 1
    log.write(
        {
            "event": "eval",
            "step": step,
            "eval_loss": round(loss, 6),
            "best_eval_loss": round(state["best_eval"], 6),
            "improved": improved,
            "final": final,
        }
    )
    bar.message(f"eval at step {step}: loss {loss:.4f}{' (best)' if improved else ''}")
    stop = bool(cfg.patience) and state["bad_evals"] >= cfg.patience
    return best, stop


def _checkpoint(cfg, step, params, optimizer, state, best, dist) -> None:
    rng = torch.get_rng_state()
    rngs = [rng]
    if dist.world > 1:
        gathered = [None] * dist.world
        torch.distributed.all_gather_object(gathered, rng.tolist())
        rngs = [torch.tensor(g, dtype=torch.uint8) for g in gathered]
    if dist.main:
        meta = {"state": state, "config": cfg.to_dict(), "world_size": dist.world}
        ckpt.save_checkpoint(
            cfg.checkpoint_path, step, params, optimizer, rngs, meta, best, keep=cfg.keep_checkpoints
        )
    if dist.world > 1:
        torch.distributed.barrier()


def _resume(cfg, params, optimizer, state, dist):
    candidates = [ckpt.find_checkpoint(cfg.resume, cfg.checkpoint_path)]
    if cfg.resume == "latest":
        candidates = list(reversed(ckpt.list_checkpoints(cfg.checkpoint_path)))
    last_err = None
    for path in candidates:
        try:
            meta, saved, optim, best, rngs = ckpt.load_checkpoint(path)
            break
        except EdgeLoraError as err:  # unreadable: fall back to the previous one
            last_err = err
    else:
        raise last_err
    old = meta.get("config", {})
    for key, value in cfg.to_dict().items():
        if (
            key not in RESUME_FREE
            and key in old
            and old[key] != value
            and not (isinstance(value, list) and list(old[key]) == value)
        ):
            raise EdgeLoraError(
                f"setting {key!r} was {old[key]!r} in the checkpointed run, now {value!r}",
                path=path,
                hint="resume with the same settings (only steps, epochs, logging, evaluation and checkpoint options may change)",
            )
    if meta.get("world_size", 1) != dist.world:
        raise EdgeLoraError(
            f"checkpoint was written by {meta.get('world_size')} processes, this run has {dist.world}",
            path=path,
            hint="resume with the same number of processes",
        )
    missing = set(params) - set(saved)
    if missing:
        raise EdgeLoraError(
            f"checkpoint lacks {sorted(missing)[0]!r}",
            path=path,
            hint="was it written with other LoRA settings?",
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    ckpt.restore_optimizer(optimizer, params, optim)
    state.update(meta.get("state", {}))
    if dist.rank in rngs:
        torch.set_rng_state(rngs[dist.rank])
    return int(meta["step"]), (best or None)
