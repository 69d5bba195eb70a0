"""Adapters on the ONNX engine: each adapter set a request asks for becomes one dict of LoRA feeds
(ranks concatenated, scales folded into B), built once and cached so that a swap is a lookup; on
the GPU those feeds are uploaded once and stay resident. Also what one request runs
(:class:`RequestChoice`): a session and its fixed LoRA inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.errors import EdgeLoraError
from edge_lora.onnx_format import lora_feeds, names
from runtime.engine import LoadedAdapter

if TYPE_CHECKING:
    from runtime.onnx_backend import OnnxEngine

LORA_DTYPES = {"float32": np.float32, "float16": np.float16}
SET_CACHE_SIZE = 8


@dataclass
class RequestChoice:
    """What one request runs: a session, the LoRA inputs fixed for the request, and either run
    options with an active ``LoraAdapter`` or ``owner``, which keeps the memory behind ``lora`` alive."""

    session: object
    lora: dict
    run_options: object = None
    owner: object = None


def added_rows(lora: dict) -> int:
    """How many new-token rows a request feeds (numpy arrays or OrtValues), past the table's zero row."""
    rows = lora.get(names.ADDED_EMBED_ROWS)
    if rows is None:
        return 0
    shape = rows.shape() if callable(rows.shape) else rows.shape
    return int(shape[0]) - 1


def logit_columns(engine: OnnxEngine, choice: RequestChoice) -> tuple[int, int]:
    """``(new-token rows fed, logits width)`` of a request: one logit per row after the base vocabulary."""
    rows = added_rows(choice.lora)
    return rows, engine.config.vocab_size + rows


class OnnxAdapterSets:
    """The adapter half of :class:`~runtime.onnx_backend.OnnxEngine` (mixed into it): checking an
    adapter against the graph's LoRA slots, the cache of adapter sets' feeds (``_set_cache``, under
    ``_cache_lock``), their device copies, and the choice of session and feeds per request."""

    def _attach(self, name: str, adapter: Adapter, source: Path) -> object:
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
        norms = self._dora_norms(adapter, source) if adapter.dora else None
        self._start_lora()  # requests with adapters need the LoRA session: load it while the caller goes on
        # DoRA's feeds are built here from the weights this bundle holds (its norms depend on them)
        if not adapter.dora and not adapter.token_rows:
            self._prime_single_set(name, adapter)
        return {"dora": adapter.dora, "norms": norms}

    def _dora_norms(self, adapter: Adapter, source: Path) -> dict:
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
        the set cache (its first request finds it; evicted like any set, then rebuilt on demand). The
        bundle's .onnx_adapter holds the same tensors (for onnxruntime-genai), but ONNX Runtime reads
        one only from a path: a second file, a second hash and a gap between check and use."""
        arrays = lora_feeds.stack_lora([(adapter, 1.0)], self.slots, self.lora_dtype)
        values = {k: self._ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
        with self._cache_lock:
            entry = {"arrays": arrays, "values": values, "adapters": {name: adapter}}
            self._set_cache[((name, 1.0),)] = entry
            while len(self._set_cache) > SET_CACHE_SIZE:
                self._set_cache.popitem(last=False)

    def _detach(self, name: str, handle: object) -> None:
        with self._cache_lock:
            for key in [k for k in self._set_cache if any(n == name for n, _ in k)]:
                del self._set_cache[key]

    def _feeds_for(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> dict:
        """The cache entry of one adapter set: its OrtValues under ``values``, built once (a swap is
        a lookup); on the GPU also their device copies under ``device``, uploaded on first use."""
        # with DoRA the order matters (PEFT rescales what the adapters before it added): the caller's order
        dora = any(loaded[n].adapter.dora for n in adapter_set)
        order = list(adapter_set.items()) if dora else sorted(adapter_set.items())
        key = tuple(sorted(adapter_set.items()))
        if dora and len(order) > 1:
            key = (("__order__", 1.0), *order)
        with self._cache_lock:
            hit = self._set_cache.get(key)
            if hit is not None and all(hit["adapters"][n] is loaded[n].adapter for n in adapter_set):
                self._set_cache.move_to_end(key)
                return hit
        arrays = lora_feeds.stack_lora(
            [(loaded[n].adapter, s) for n, s in order],
            self.slots,
            self.lora_dtype,
            [loaded[n].handle.get("norms") for n, _ in order],
        )
        vocab = self.added_vocab(loaded)  # the set's new tokens, checked for clashes
        arrays.update(lora_feeds.added_rows_feeds(vocab.embed, vocab.head, self.config.tie_word_embeddings))
        values = {k: self._ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
        entry = {"arrays": arrays, "values": values, "adapters": {n: loaded[n].adapter for n in adapter_set}}
        with self._cache_lock:
            self._set_cache[key] = entry
            while len(self._set_cache) > SET_CACHE_SIZE:
                self._set_cache.popitem(last=False)
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

    def _resident_lora_bytes(self) -> int:
        """Bytes of LoRA tensors the engine holds on the device: cached sets (single adapters too), pads."""
        with self._cache_lock:
            holders = [*self._set_cache.values(), self._no_adapters]
        values = {id(v): v for h in holders for v in (h.get("device") or {}).values()}
        values.update({id(v): v for v in self._gpu_pads.values()})
        return sum(v.tensor_size_in_bytes() for v in values.values())

    def _pick(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> RequestChoice:
        """The session, LoRA feeds and run options for one request's adapter set."""
        if not adapter_set:
            if self.plain_session or not self.gpu:
                return RequestChoice(self.plain_session or self.lora_session, {})
            return RequestChoice(self.lora_session, self._on_device(self._no_adapters, {}))
        entry = self._feeds_for(adapter_set, loaded)
        return RequestChoice(
            self.lora_session, self._on_device(entry, entry["values"]) if self.gpu else entry["values"]
        )
