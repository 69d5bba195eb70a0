"""Sessions specialised to the shape of an adapter set: the LoRA graph cut to the groups the set touches.

The LoRA session takes every adapter set as feeds, so each of its linear layers runs a LoRA side path
and a DoRA rescale (a multiply by 1 unless the set is DoRA) whatever the set touches. A specialised
graph keeps only what a set of its shape uses: the side paths of the groups it feeds, and the DoRA
rescales only where it feeds them. The LoRA weights stay feeds, so one such session serves every set of
that shape (most adapters target every linear layer: one session) and costs no copy of them. On
SmolLM2-135M int4 (2 threads) a decode step over the plain graph's cost: rank 16 on q_proj and v_proj
+16% through the LoRA session, +8% through the specialised one; rank 16 on every linear layer +37..44%
and +30..36%. Making the LoRA weights constants as well cost ~80 MB of memory per set for a few points,
so it was not kept (docs/backend-notes.md).

A specialised session is built in the background on the first request of its shape, over the same
shared weights and prepacked-weights container as the other sessions; requests take it once it is
ready and the LoRA session until then, so adding an adapter stays fast. At most ``capacity`` shapes are
kept, least recently used out. Its logits equal the LoRA session's bit for bit (every family and
quantization of the tests, DoRA and new tokens included, on x86-64 and on ARM64 under QEMU), so a set's
results do not change when its build lands; that needs the DoRA rescale kept before a bias (below). It
is opt-in (``OnnxEngine(specialise=N)``) for its memory: see ``DEFAULT_CAPACITY``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np

from edge_lora.onnx_format import names
from edge_lora.onnx_format.graph_prune import node_names, prune_nodes

LORA_ADD, DORA_MUL = "/lora/Add", "/lora/DoraScale"  # the node names of a group's side path and rescale
BIAS_ADD = "/BiasAdd"  # a group's bias (Qwen2: q, k, v) after its rescale (converters/onnx_decoder.py)
# off unless the app asks: a build opens the graph again, +40 MB at peak on SmolLM2-135M int4 (276 -> 315 MB
# for a fresh process that adds an adapter and runs a request), and takes CPU beside the first requests
DEFAULT_CAPACITY = 0


def shape_of(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The LoRA and DoRA inputs a set feeds (a LoRA pair of rank 0 feeds nothing): what its graph keeps."""
    return tuple(sorted(k for k, v in arrays.items() if is_lora_input(k) and v.size))


def specialised_model(model_path: Path, shape: tuple[str, ...]) -> bytes:
    """``model.onnx`` without the side paths and DoRA rescales of the groups ``shape`` does not feed, and
    without their inputs; every other input (tokens, KV, LoRA weights, new-token rows) stays."""
    model = model_path.read_bytes()  # the graph only: the weights stay in the data file
    fed = set(shape)
    nodes = node_names(model)
    biased = {node[: -len(BIAS_ADD)] for node in nodes if node.endswith(BIAS_ADD)}
    bypass = set()
    for node in nodes:
        if node.endswith(LORA_ADD):
            group = node[: -len(LORA_ADD)]
            if not {names.lora_a(group), names.lora_b(group)} <= fed:
                bypass.add(node)
        elif node.endswith(DORA_MUL):
            group = node[: -len(DORA_MUL)]
            # a rescale before a bias stays: without it ONNX Runtime fuses the bias into MatMulNBits,
            # which rounds otherwise than the LoRA session (Qwen2's qkv bias: 3.6e-7 in the logits)
            if names.dora_scale(group) not in fed and group not in biased:
                bypass.add(node)
    return prune_nodes(model, bypass)


def is_lora_input(name: str) -> bool:
    """Whether a feed of an adapter set is a LoRA or DoRA input (the rest: new-token rows)."""
    return name.endswith((".lora_A.T", ".lora_B.T", ".dora_scale"))


class SpecialisedSessions:
    """The specialised sessions of an engine, by shape: ready ones, and at most one being built."""

    def __init__(
        self, build: Callable[[bytes], object], model_path: Path, capacity: int = DEFAULT_CAPACITY
    ) -> None:
        self._build, self.model_path, self.capacity = build, model_path, capacity
        self._ready: OrderedDict[Hashable, object] = OrderedDict()
        self._building: tuple[Hashable, threading.Thread] | None = None
        self._lock = threading.Lock()
        self.built = self.failed = 0
        self.last_error: str | None = None

    def get(self, shape: tuple[str, ...]) -> object | None:
        """The session of this shape when it is ready; else None, its build started unless another runs."""
        if self.capacity <= 0:
            return None
        with self._lock:
            session = self._ready.get(shape)
            if session is not None:
                self._ready.move_to_end(shape)
                return session
            if self._building is not None:
                return None
            thread = threading.Thread(target=self._make, args=(shape,), daemon=True)
            self._building = (shape, thread)
        thread.start()
        return None

    def _make(self, key: tuple[str, ...]) -> None:
        try:
            session = self._build(specialised_model(self.model_path, key))
        except Exception as err:  # the LoRA session keeps serving the set: a failed build costs speed only
            with self._lock:
                if self._building is not None and self._building[1] is threading.current_thread():
                    self._building = None
                self.failed += 1
                self.last_error = str(err).splitlines()[0] if str(err) else type(err).__name__
            return
        with self._lock:
            if self._building is not None and self._building[1] is threading.current_thread():
                self._ready[key] = session  # not dropped while it was built
                self.built += 1
                while len(self._ready) > self.capacity:
                    self._ready.popitem(last=False)
                self._building = None

    def wait(self) -> None:
        """Until the build in flight (if any) is done: for tests and benchmarks that time the ready state."""
        with self._lock:
            building = self._building
        if building is not None:
            building[1].join()

    def drop(self, predicate: Callable[[Hashable], bool]) -> None:
        """Forget the sessions (and the build) of the shapes ``predicate`` names (a merge: all)."""
        with self._lock:
            for key in [k for k in self._ready if predicate(k)]:
                del self._ready[key]
            if self._building is not None and predicate(self._building[0]):
                self._building = None  # its result is thrown away when it lands

    def info(self) -> dict:
        with self._lock:
            return {
                "capacity": self.capacity,
                "ready": len(self._ready),
                "building": self._building is not None,
                "built": self.built,
                "failed": self.failed,
                **({"last_error": self.last_error} if self.last_error else {}),
            }
