"""``--compute-dtype auto`` by measurement: a few timed forward+backward passes of the run's own model
on its first batch, in fp32 and in bf16, and the run trains in the faster.

Native bf16 (AMX, AVX512-BF16, a CUDA GPU) is not always faster: on a 2-core Intel AMX VM a tiny model
trained at 0.67x PEFT in bf16 and 1.14x in fp32, while the SmolLM2-135M shape was 1.75x in bf16. No
rule from the flags held on both, so the trainer measures where bf16 is native (elsewhere fp32
without measuring: emulated bf16 is several times slower). The passes change nothing the run sees:
gradients are dropped and the random state is put back, so a run is the same with either choice but
for the dtype itself. Cost: ``2 * (WARMUP + TIMED)`` passes, a few optimizer steps' worth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edge_lora.train.devices import Dist
from edge_lora.train.quant import QuantEmbedding

WARMUP, TIMED = 1, 2


@dataclass
class DtypeChoice:
    dtype: torch.dtype
    seconds: dict[str, float] = field(default_factory=dict)  # best timed pass per dtype ("float32", ...)
    how: str = "rule"  # "rule": no measurement needed; "measured": the faster of the timed passes

    def record(self) -> dict:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "how": self.how,
            "pass_seconds": self.seconds,
        }

    def describe(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        if self.how != "measured":
            return f"compute {name} ({self.how})"
        times = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.seconds.items())
        return f"compute {name} (measured per pass: {times})"


def to_dtype(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Store the frozen base in ``dtype`` (trainable LoRA weights stay fp32); returns the tensors it
    replaced, for :func:`restore`."""
    replaced = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                replaced[name] = p.data
                p.data = p.data.to(dtype)
        for m in model.modules():
            if isinstance(m, QuantEmbedding):
                m.dtype = dtype
    return replaced


def restore(model: nn.Module, replaced: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, data in replaced.items():
            params[name].data = data
        for m in model.modules():
            if isinstance(m, QuantEmbedding):
                m.dtype = dtype


def measure_dtypes(
    model: nn.Module, run_pass: Callable[[bool], None], dist: Dist, device: torch.device
) -> DtypeChoice:
    """Time ``run_pass(bf16)`` (one forward+backward) in fp32, then in bf16, on a model stored in fp32;
    leave the model in the faster dtype. Every rank takes the same choice (times summed over ranks)."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    fp32 = _best_pass(model, run_pass, False, device)
    replaced = to_dtype(model, torch.bfloat16)
    bf16 = _best_pass(model, run_pass, True, device)
    fp32, bf16 = dist.all_sum([fp32, bf16])
    dtype = torch.bfloat16 if bf16 < fp32 else torch.float32
    if dtype == torch.float32:
        restore(model, replaced, torch.float32)
    del replaced
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return DtypeChoice(dtype, {"float32": fp32 / dist.world, "bfloat16": bf16 / dist.world}, "measured")


def _best_pass(model: nn.Module, run_pass: Callable[[bool], None], bf16: bool, device: torch.device) -> float:
    times = []
    for i in range(WARMUP + TIMED):
        _sync(device)
        t0 = time.perf_counter()
        run_pass(bf16)
        _sync(device)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
        for p in model.parameters():
            p.grad = None
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
