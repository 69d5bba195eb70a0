"""The physical limit of decoding: memory bandwidth / bytes one token must read.

Bandwidth: numpy reductions streaming a buffer far larger than the last-level cache, one slice per
thread (ufunc loops release the GIL), best of several passes: what ``threads`` cores can pull from
DRAM. The same read over a buffer the size of one token's working set tells what the caches give
(on a CPU whose LLC holds the whole model, decoding can beat the DRAM roofline).

Bytes per token, from the actual files: every weight matrix the token multiplies (a gathered
embedding table counts one row, unless the tied head reads it whole), the active adapters' A and B
at the dtype the engine holds them in, and the KV cache read at the average context of the request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def bandwidth_gbs(buffer_mb: int, threads: int = 2, passes: int = 5) -> float:
    """Best read bandwidth (GB/s) over ``passes`` reductions of a ``buffer_mb`` buffer by ``threads``
    threads."""
    data = np.ones(buffer_mb * (1 << 20) // 4, dtype=np.float32)  # touched: really resident
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(passes):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def llc_mb() -> float:
    """The last-level cache of this machine in MB (0 when unknown)."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            sizes.append(
                int(text[:-1]) / (1024 if text.endswith("K") else 1)
                if text[-1] in "KM"
                else int(text) / 2**20
            )
        except (OSError, ValueError):
            continue
    return max(sizes, default=0.0)


@dataclass
class TokenBytes:
    weights: int
    adapters: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.kv_cache


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the tensors one token reads in a GGUF: all but an untied ``token_embd`` (one row)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    embd = tensors.get("token_embd.weight", 0)
    total = sum(tensors.values())
    if "output.weight" in tensors:  # untied: the table is only gathered
        total -= embd
    return total


def onnx_weight_bytes(folder: Path) -> int:
    """Bytes of the initializers one token reads in our ONNX folder: the fp16 embedding table is
    gathered only (the int4 head has its own copy); the rotary caches are read one row per token."""
    import json

    layout = json.loads((folder / "onnx_layout.json").read_text())
    gathered = ("model.embed_tokens.weight", "rotary.cos_cache", "rotary.sin_cache")
    return sum(t["length"] for name, t in layout["tensors"].items() if name not in gathered)


def adapter_bytes(config, rank: int, bytes_per_value: int, count: int = 1) -> int:
    """A and B of ``count`` all-linear rank-``rank`` adapters."""
    from edge_lora.targets import linear_modules

    return count * sum(rank * (o + i) for o, i in linear_modules(config).values()) * bytes_per_value


def kv_bytes(config, context: int, bytes_per_value: int) -> int:
    return (
        2
        * config.num_hidden_layers
        * config.num_key_value_heads
        * config.head_dim
        * context
        * bytes_per_value
    )


def roofline_tok_s(bandwidth: float, token_bytes: TokenBytes) -> float:
    return bandwidth * 1e9 / token_bytes.total


def measure(threads: int, quick: bool, working_set_mb: list[int]) -> dict:
    """DRAM bandwidth (buffer ≥ 4x the LLC, at least 1 GiB) and cache-level bandwidth at each working-set
    size."""
    llc = llc_mb()
    dram_mb = int(max(1024, 4 * llc)) if not quick else int(max(512, 2 * llc))
    passes = 3 if quick else 5
    return {
        "threads": threads,
        "llc_mb": llc,
        "dram_buffer_mb": dram_mb,
        "dram_gbs": bandwidth_gbs(dram_mb, threads, passes),
        "working_set_gbs": {str(mb): bandwidth_gbs(mb, threads, passes + 2) for mb in working_set_mb},
    }
