"""Evaluation during a run: the mean eval loss over all ranks, and the early-stopping bookkeeping
(best loss so far, a copy of the best weights, evaluations without improvement)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_lora.train.config import TrainConfig
from edge_lora.train.data import Example, collate
from edge_lora.train.devices import Dist
from edge_lora.train.progress import MetricsLog, Progress
from edge_lora.train.trainable_model import TrainModule


@torch.no_grad()
def evaluate(module: TrainModule, examples: list[Example], batch_size: int, dist: Dist, pad_id: int) -> float:
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


@dataclass
class Evaluator:
    """Evaluates ``examples`` and tracks the run's best loss in ``state`` (the checkpointed run state)."""

    module: TrainModule
    examples: list[Example]
    cfg: TrainConfig
    dist: Dist
    pad_id: int
    log: MetricsLog
    bar: Progress

    def __call__(
        self,
        params: dict[str, torch.nn.Parameter],
        state: dict,
        best: dict[str, torch.Tensor] | None,
        step: int,
        final: bool = False,
    ) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """``(best weights, whether to stop early)`` after evaluating at ``step``."""
        cfg = self.cfg
        loss = evaluate(self.module, self.examples, cfg.batch_size, self.dist, self.pad_id)
        state["last_eval"] = loss
        improved = state["best_eval"] is None or loss < state["best_eval"] - cfg.min_delta
        if improved:
            state["best_eval"], state["bad_evals"] = loss, 0
            best = {n: p.detach().clone() for n, p in params.items()}
        else:
            state["bad_evals"] += 1
        self.log.write(
            {
                "event": "eval",
                "step": step,
                "eval_loss": round(loss, 6),
                "best_eval_loss": round(state["best_eval"], 6),
                "improved": improved,
                "final": final,
            }
        )
        self.bar.message(f"eval at step {step}: loss {loss:.4f}{' (best)' if improved else ''}")
        stop = bool(cfg.patience) and state["bad_evals"] >= cfg.patience
        return best, stop
