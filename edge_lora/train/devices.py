"""Devices and processes for training: which device and compute dtype, the data-parallel group,
and the process-wide settings (allocator, denormals) a training run wants."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from edge_lora.errors import EdgeLoraError


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


# below this many frozen parameters a model is overhead-bound: bf16's casts cost more than its matmuls
# save (measured: docs/training.md), so auto takes fp32 without measuring
PROBE_MIN_PARAMS = 20_000_000


def resolve_compute_dtype(name: str, device: torch.device, n_params: int | None = None) -> torch.dtype | None:
    """fp32 or bf16 as asked. ``auto``: fp32 where bf16 is not native (or the model, ``n_params``
    frozen parameters, is tiny); None where it is native: measure both (:mod:`.dtype_probe`)."""
    if name == "bf16":
        return torch.bfloat16
    native = (device.type == "cpu" and cpu_has_native_bf16()) or (
        device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if name == "auto" and native and (n_params is None or n_params >= PROBE_MIN_PARAMS):
        return None
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


def data_parallel(module: nn.Module, dist: Dist) -> nn.Module:
    """``module`` itself in one process, wrapped in DistributedDataParallel across several."""
    if dist.world == 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
    )


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

    # a peaked softmax underflows into denormals, which x86 computes ~10x slower
    torch.set_flush_denormal(True)
    if not sys.platform.startswith("linux") or os.environ.get("EDGE_LORA_DEFAULT_MALLOC") == "1":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass
