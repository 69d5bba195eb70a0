"""Adapters on the ONNX engine (:class:`AdapterSets`, a part the engine owns): each adapter set a request
asks for becomes one dict of LoRA feeds (ranks concatenated, scales folded into B), built once and
cached so that a swap is a lookup; on the GPU those feeds are uploaded once and stay resident. It
also chooses what one request runs (:class:`~runtime.onnx.request.RequestChoice`): base-only
requests take the plain session where there is one, the others the LoRA session with their feeds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format import lora_feeds, names
from edge_lora.onnx_format.weight_store import WeightStore
from runtime.engine import LoadedAdapter
from runtime.new_tokens import AddedVocab
from runtime.onnx.request import RequestChoice
from runtime.onnx.specialised import is_lora_input, shape_of

LORA_DTYPES = {"float32": np.float32, "float16": np.float16}
SET_CACHE_SIZE = 8


class AdapterSets:
    """Checks adapters against the graph's LoRA slots and holds the cache of adapter sets' feeds
    (``cache``: set key -> {"arrays", "values", "adapters", and on the GPU "device"}), their device
    copies and the rank-1 pads the GPU needs in place of zero-size defaults."""

    def __init__(
        self,
        config: ModelConfig,
        layout: dict,
        sessions: object,
        weights: WeightStore,
        added_vocab: Callable[[dict[str, LoadedAdapter]], AddedVocab],
        gpu: object = None,
    ) -> None:
        self.config, self.layout, self.sessions, self.weights = config, layout, sessions, weights
        self.added_vocab, self.gpu = added_vocab, gpu
        self.slots = {m: tuple(s) for m, s in layout["lora_slots"].items()}
        self.lora_dtype = LORA_DTYPES[layout.get("lora_dtype", "float32")]
        self.cache: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._gpu_pads: dict[str, object] = {}  # LoRA input -> rank-1 zeros on the device
        # the empty set's device feeds (pads only), when there is no plain session
        self._no_adapters: dict = {}
        self._upload_lock = threading.Lock()

    # --- adding and removing ------------------------------------------------------------

    def attach(self, name: str, adapter: Adapter, source: Path) -> dict:
        """Check ``adapter`` against the graph; the handle the engine keeps for it."""
        if adapter.token_rows and not self.layout.get("added_rows"):
            raise EdgeLoraError(
                "this bundle's ONNX graph takes no new-token rows (exported before layout "
                f"version {names.ADDED_ROWS_LAYOUT_VERSION})",
                path=source,
                hint="re-export the bundle with this edge-lora",
            )
        for module in adapter.modules:
            if module not in self.slots:
                hint = (
                    "this bundle was exported before tied heads got a LoRA slot: re-export it with this "
                    "edge-lora"
                    if module == "lm_head"
                    else "wrong base model?"
                )
                raise EdgeLoraError(
                    f"module {module!r} has no LoRA slot in this ONNX model", path=source, hint=hint
                )
        norms = self.dora_norms(adapter, source) if adapter.dora else None
        # requests with adapters need the LoRA session: it loads while the caller goes on
        self.sessions.start_lora()
        # DoRA's feeds are built here from the weights this bundle holds (its norms depend on them)
        if not adapter.dora and not adapter.token_rows:
            self._prime_single_set(name, adapter)
        return {"dora": adapter.dora, "norms": norms}

    def dora_norms(self, adapter: Adapter, source: Path) -> dict:
        """DoRA's weight-norm terms from the (dequantized) weights this bundle runs, once per adapter."""
        from edge_lora.dora import prepare_norms

        if not self.layout.get("dora"):
            raise EdgeLoraError(
                "this bundle's ONNX graph has no DoRA rescale input (exported before layout version 3)",
                path=source,
                hint="re-export the bundle with this edge-lora, or engine.merge() the adapter",
            )
        return prepare_norms(adapter, self.weights.module_weights(source))

    def _prime_single_set(self, name: str, adapter: Adapter) -> None:
        """The set ``{name: 1.0}`` stacked now, from the arrays that were hash-checked and parsed, into
        the cache (its first request finds it; evicted like any set, then rebuilt on demand). The
        bundle's .onnx_adapter holds the same tensors (for onnxruntime-genai), but ONNX Runtime reads
        one only from a path: a second file, a second hash and a gap between check and use."""
        arrays = lora_feeds.stack_lora([(adapter, 1.0)], self.slots, self.lora_dtype)
        values = {k: self.sessions.value(v) for k, v in arrays.items()}
        self._store(((name, 1.0),), {"arrays": arrays, "values": values, "adapters": {name: adapter}})

    def _store(self, key: tuple, entry: dict) -> None:
        with self._lock:
            self.cache[key] = entry
            while len(self.cache) > SET_CACHE_SIZE:
                self.cache.popitem(last=False)

    def detach(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self.cache if any(n == name for n, _ in k)]:
                del self.cache[key]

    def clear(self) -> None:
        with self._lock:
            self.cache.clear()

    # --- feeds ----------------------------------------------------------------------------

    def feeds_for(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> dict:
        """The cache entry of one adapter set: its values under ``values``, built once (a swap is a
        lookup); on the GPU also their device copies under ``device``, uploaded on first use."""
        # with DoRA the order matters (PEFT rescales what the adapters before it added): the caller's order
        dora = any(loaded[n].adapter.dora for n in adapter_set)
        order = list(adapter_set.items()) if dora else sorted(adapter_set.items())
        key = tuple(sorted(adapter_set.items()))
        if dora and len(order) > 1:
            key = (("__order__", 1.0), *order)
        with self._lock:
            hit = self.cache.get(key)
            if hit is not None and all(hit["adapters"][n] is loaded[n].adapter for n in adapter_set):
                self.cache.move_to_end(key)
                return hit
        arrays = lora_feeds.stack_lora(
            [(loaded[n].adapter, s) for n, s in order],
            self.slots,
            self.lora_dtype,
            [loaded[n].handle.get("norms") for n, _ in order],
        )
        vocab = self.added_vocab(loaded)  # the set's new tokens, checked for clashes
        arrays.update(lora_feeds.added_rows_feeds(vocab.embed, vocab.head, self.config.tie_word_embeddings))
        values = {k: self.sessions.value(v) for k, v in arrays.items()}
        entry = {"arrays": arrays, "values": values, "adapters": {n: loaded[n].adapter for n in adapter_set}}
        self._store(key, entry)
        return entry

    def _on_device(self, holder: dict, values: dict) -> dict:
        """``values`` uploaded to the GPU once (kept in ``holder``, which a removed adapter's
        handle or an evicted cache entry takes away), plus rank-1 zeros for every LoRA input the
        set leaves out: the GPU must never see the graph's zero-size defaults (WebGPU crashes)."""
        with self._upload_lock:
            device = holder.get("device")
            if device is None:
                device = {k: self.gpu.upload(v, "lora") for k, v in values.items()}
                holder["device"] = device
            if not self._gpu_pads:
                self._gpu_pads = {
                    k: self.gpu.upload(v, "lora")
                    for k, v in lora_feeds.zero_pads(self.slots, self.lora_dtype).items()
                }
        return {**{k: v for k, v in self._gpu_pads.items() if k not in device}, **device}

    def resident_lora_bytes(self) -> int:
        """Bytes of LoRA tensors the engine holds on the device: cached sets (single adapters too), pads."""
        with self._lock:
            holders = [*self.cache.values(), self._no_adapters]
        values = {id(v): v for h in holders for v in (h.get("device") or {}).values()}
        values.update({id(v): v for v in self._gpu_pads.values()})
        return sum(v.tensor_size_in_bytes() for v in values.values())

    def choice(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> RequestChoice:
        """The session and LoRA feeds for one request's adapter set."""
        sessions = self.sessions
        if not adapter_set:
            plain = sessions.plain
            if plain is not None or not self.gpu:
                return RequestChoice(plain if plain is not None else sessions.lora, {})
            return RequestChoice(sessions.lora, self._on_device(self._no_adapters, {}))
        entry = self.feeds_for(adapter_set, loaded)
        special = getattr(sessions, "specialised", None)
        if special is not None:  # the CPU's C API path: the graph of the set's shape once it is built
            shape = entry.get("shape")
            if shape is None:
                shape = entry["shape"] = shape_of(entry["arrays"])
            session = special.get(shape)
            if session is not None:
                feeds = {k: v for k, v in entry["values"].items() if k in shape or not is_lora_input(k)}
                return RequestChoice(session, feeds, owner=entry)
        values = self._on_device(entry, entry["values"]) if self.gpu else entry["values"]
        return RequestChoice(sessions.lora, values)
