"""Training checkpoints: one safetensors file per checkpoint, written atomically, no pickle.

``<dir>/step-00000010.safetensors`` holds the trainable tensors (``param.<name>``), the AdamW
state (``optim.<name>.exp_avg|exp_avg_sq|step``), the best-so-far weights when evaluation keeps
them (``best.<name>``), each rank's RNG state (``rng.<rank>``, uint8) and, in the metadata, JSON
with the step, the early-stopping state and the run's settings. The file appears under its final
name only once it is complete (write to a temporary file, fsync, rename), so a kill at any moment
leaves the previous checkpoints intact; resuming picks the highest step that reads back cleanly.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import torch

from edge_lora.atomic import atomic_path
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import SafetensorsFile, serialize

META_KEY = "edge_lora_checkpoint"
FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})\.safetensors$")


def test_hook(event: str) -> None:
    """Tests kill the process at a named point with a real SIGKILL (``EDGE_LORA_TEST_KILL=event``)."""
    if os.environ.get("EDGE_LORA_TEST_KILL") == event:
        os.kill(os.getpid(), signal.SIGKILL)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().numpy()


def save_checkpoint(
    directory: Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rng_states: list[torch.Tensor],
    state: dict,
    best: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    tensors: dict[str, np.ndarray] = {}
    by_id = {id(p): name for name, p in params.items()}
    for name, p in params.items():
        tensors[f"param.{name}"] = _np(p.float())
    for p, st in optimizer.state.items():
        name = by_id[id(p)]
        for key, value in st.items():
            tensors[f"optim.{name}.{key}"] = _np(
                torch.as_tensor(value, dtype=torch.float32) if key == "step" else value.float()
            )
    if best:
        for name, t in best.items():
            tensors[f"best.{name}"] = _np(t.float())
    for rank, rng in enumerate(rng_states):
        tensors[f"rng.{rank}"] = _np(rng.to(torch.uint8))
    meta = dict(state, format=FORMAT, step=step)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step-{step:08d}.safetensors"
    with atomic_path(path) as tmp:
        tmp.write_bytes(serialize(tensors, {META_KEY: json.dumps(meta, sort_keys=True)}))
        test_hook(f"checkpoint-written-{step}")
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str, directory: Path) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not path.is_file():
            raise EdgeLoraError(
                "checkpoint not found", path=path, hint=f"checkpoints of this run are in {directory}"
            )
        return path
    found = list_checkpoints(directory)
    if not found:
        raise EdgeLoraError(
            "no checkpoint to resume from",
            path=directory,
            hint="pass --checkpoint-every N in the first run, or --checkpoint-dir where they are",
        )
    return found[-1]


# ``(meta, params, optim, best, rngs)``, what :func:`load_checkpoint` returns
LoadedCheckpoint = tuple[
    dict,
    dict[str, torch.Tensor],
    dict[str, dict[str, torch.Tensor]],
    dict[str, torch.Tensor],
    dict[int, torch.Tensor],
]


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """``(meta, params, optim, best, rngs)``: dicts of torch tensors keyed by parameter name."""
    st = SafetensorsFile(path)
    raw = st.metadata.get(META_KEY)
    if raw is None:
        raise EdgeLoraError("not an edge-lora training checkpoint", path=path)
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise EdgeLoraError(f"checkpoint format {meta.get('format')!r} is not supported", path=path)
    params: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    best: dict[str, torch.Tensor] = {}
    rngs: dict[int, torch.Tensor] = {}
    for key in st.keys():
        t = torch.from_numpy(st.get(key))
        kind, _, rest = key.partition(".")
        if kind == "param":
            params[rest] = t
        elif kind == "best":
            best[rest] = t
        elif kind == "rng":
            rngs[int(rest)] = t
        elif kind == "optim":
            name, _, field = rest.rpartition(".")
            optim.setdefault(name, {})[field] = t
    return meta, params, optim, best, rngs


def restore_optimizer(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], saved: dict[str, dict]
) -> None:
    for name, p in params.items():
        if name not in saved:
            continue
        st = saved[name]
        optimizer.state[p] = {
            "step": st["step"].float().reshape(()),
            "exp_avg": st["exp_avg"].to(p.device, p.dtype).clone(),
            "exp_avg_sq": st["exp_avg_sq"].to(p.device, p.dtype).clone(),
        }
