"""Sampling shared by every backend: greedy, temperature, top-k, top-p, repetition penalty, seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(
        default_factory=list
    )  # e.g. a chat template's end of turn, besides the model's eos

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        params = cls(**kwargs)
        if (
            params.temperature < 0
            or not 0 < params.top_p <= 1
            or params.top_k < 0
            or params.repetition_penalty <= 0
        ):
            from edge_lora.errors import EdgeLoraError

            raise EdgeLoraError(
                "bad sampling settings",
                hint="temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0",
            )
        if isinstance(params.stop, str):
            params.stop = [params.stop]
        return params


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)  # read-only below until a step makes its own array
        if p.repetition_penalty != 1.0 and history:
            logits = logits.copy()  # the caller's logits stay as they were
            seen = np.unique(np.asarray(history))
            seen = seen[seen < logits.shape[0]]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = cumulative - probs[order] < p.top_p  # always keeps the most likely token
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))
