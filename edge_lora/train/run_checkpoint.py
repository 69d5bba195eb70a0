"""Saving and resuming a whole run through :mod:`.checkpoint`: every rank's RNG gathered into one
file, and a resume refused unless the settings, process count and LoRA layout match the saved run."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_lora.errors import EdgeLoraError
from edge_lora.train import checkpoint as ckpt
from edge_lora.train.config import RESUME_FREE, TrainConfig
from edge_lora.train.devices import Dist


def save_run_checkpoint(
    cfg: TrainConfig,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    state: dict,
    best: dict[str, torch.Tensor] | None,
    dist: Dist,
) -> None:
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


def resume_run(
    cfg: TrainConfig,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    state: dict,
    dist: Dist,
) -> tuple[int, dict[str, torch.Tensor] | None]:
    """Load the checkpoint ``cfg.resume`` names into ``params``, ``optimizer``, ``state`` and this
    rank's RNG; returns ``(step to continue at, best weights so far)``."""
    path, (meta, saved, optim, best, rngs) = _load_readable_checkpoint(cfg)
    _check_same_run(cfg, meta, path, dist)
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


def _load_readable_checkpoint(cfg: TrainConfig) -> tuple[Path, tuple]:
    """The checkpoint to resume from; with ``latest``, the newest one that reads back cleanly."""
    candidates = [ckpt.find_checkpoint(cfg.resume, cfg.checkpoint_path)]
    if cfg.resume == "latest":
        candidates = list(reversed(ckpt.list_checkpoints(cfg.checkpoint_path)))
    last_err = None
    for path in candidates:
        try:
            return path, ckpt.load_checkpoint(path)
        except EdgeLoraError as err:  # unreadable: fall back to the previous one
            last_err = err
    raise last_err


def _check_same_run(cfg: TrainConfig, meta: dict, path: Path, dist: Dist) -> None:
    """Refuse a resume whose settings (other than RESUME_FREE ones) or process count differ."""
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
                hint="resume with the same settings "
                "(only steps, epochs, logging, evaluation and checkpoint options may change)",
            )
    if meta.get("world_size", 1) != dist.world:
        raise EdgeLoraError(
            f"checkpoint was written by {meta.get('world_size')} processes, this run has {dist.world}",
            path=path,
            hint="resume with the same number of processes",
        )
