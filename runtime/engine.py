"""The engine both backends implement: one face for adapters, generation and logits.

A backend supplies five hooks (``_attach``, ``_detach``, ``_new_state``, ``_full_logits``,
``_merge``); this class owns everything shared: the adapter registry, per-request adapter sets,
tokenization, the sampling loop, stop strings and streaming. Requests never share decoding
state, so several threads may generate at once, each with its own adapter set.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.signing import AdapterTrust

from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class LoadedAdapter:
    name: str
    adapter: Adapter
    path: Path
    handle: object  # the backend's own representation


class DecodeState(ABC):
    """One request's decoding state (its KV cache) under one fixed adapter set."""

    @abstractmethod
    def feed(self, token_ids: list[int]) -> np.ndarray:
        """Append tokens; return the logits ``[vocab]`` after the last one."""

    def close(self) -> None:
        pass


class Engine(ABC):
    backend_name = "base"

    def __init__(self, bundle: Bundle | str | os.PathLike, *, verify_hashes: bool = True, trusted_keys=None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.config = self.bundle.config
        self.verify_hashes = verify_hashes
        # trusted_keys=None: no signature checks; a list (even empty) refuses every adapter no trusted key vouches for
        self.trust = None if trusted_keys is None else AdapterTrust(self.bundle, trusted_keys)
        self.tokenizer = Tokenizer(self.bundle.require(self.bundle.tokenizer["tokenizer"]))
        self._adapters: dict[str, LoadedAdapter] = {}
        self._default_set: dict[str, float] = {}
        self._merged: dict[str, float] = {}
        self._lock = threading.RLock()

    # --- adapters -------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | os.PathLike | None = None) -> None:
        """Load an adapter (from the bundle by name, or from an adapter file) without touching the base."""
        with self._lock:
            if name in self._adapters:
                raise EdgeLoraError(f"an adapter named {name!r} is already loaded", hint="remove_adapter() it first or pick another name")
        entry = None
        if path is None:
            entry = self.bundle.adapters.get(name)
            if entry is None:
                raise EdgeLoraError(f"bundle has no adapter {name!r} (has: {', '.join(self.bundle.adapters) or 'none'})",
                                    path=self.bundle.root)
            rel = entry["source"]
            source = self.bundle.verify_file(rel) if self.verify_hashes else self.bundle.require(rel)
        else:
            source = Path(path)
        if self.trust is not None:
            self.trust.check(source, entry)
        adapter = Adapter.load(source, base=self.config, base_fingerprint=self.bundle.base_fingerprint)
        handle = self._attach(name, adapter, source)
        with self._lock:
            raced = name in self._adapters  # another thread added the same name while this one loaded
            if not raced:
                self._adapters[name] = LoadedAdapter(name, adapter, source, handle)
        if raced:
            self._detach(name, handle)
            raise EdgeLoraError(f"an adapter named {name!r} is already loaded", hint="remove_adapter() it first or pick another name")

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            loaded = self._adapters.pop(self._known(name))
            self._default_set.pop(name, None)
        self._detach(name, loaded.handle)

    def set_adapters(self, adapters: dict[str, float] | None) -> None:
        """The adapter set requests use when they name none; ``{}`` = the base alone."""
        with self._lock:
            self._default_set = self._resolve(adapters or {})

    @property
    def adapters(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def merge(self, name: str, scale: float = 1.0) -> None:
        """Fold an adapter into the base weights: zero per-token cost from then on."""
        with self._lock:
            loaded = self._adapters[self._known(name)]
            self._merge(name, loaded, float(scale))
            self._merged[name] = self._merged.get(name, 0.0) + float(scale)

    def _known(self, name: str) -> str:
        if name not in self._adapters:
            raise EdgeLoraError(f"no adapter {name!r} is loaded (loaded: {', '.join(self._adapters) or 'none'})",
                                hint="add_adapter() it first")
        return name

    def _resolve(self, adapters: dict[str, float]) -> dict[str, float]:
        with self._lock:
            if not isinstance(adapters, dict):
                raise EdgeLoraError("adapters must be a {name: scale} mapping")
            return {self._known(n): float(s) for n, s in adapters.items() if float(s) != 0.0}

    def _request_set(self, adapters) -> tuple[dict[str, float], dict[str, LoadedAdapter]]:
        """The adapter set of one request and a snapshot of the adapters it uses."""
        with self._lock:
            chosen = dict(self._default_set) if adapters is None else self._resolve(adapters)
            return chosen, {n: self._adapters[n] for n in chosen}

    # --- inference ------------------------------------------------------------------

    def logits(self, token_ids, adapters: dict[str, float] | None = None) -> np.ndarray:
        """Full-sequence logits ``[T, vocab]`` (float32) for evaluation."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise EdgeLoraError("logits() needs at least one token")
        self._check_ids(ids)
        chosen, loaded = self._request_set(adapters)
        return self._full_logits(ids, chosen, loaded)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, *, adapters: dict[str, float] | None = None,
                 stream: bool = False, **sampling) -> str | Iterator[str]:
        params = SamplingParams.from_kwargs(max_new_tokens=max_new_tokens, **sampling)
        chunks = self._generate(prompt, params, adapters)
        return chunks if stream else "".join(chunks)

    def generate_ids(self, prompt_ids: list[int], params: SamplingParams, adapters=None) -> list[int]:
        """Token ids out, no text: what tests and benchmarks compare across backends."""
        out: list[int] = []
        for token in self._token_loop(list(prompt_ids), params, adapters):
            out.append(token)
        return out

    def _generate(self, prompt, params: SamplingParams, adapters) -> Iterator[str]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        decoder = StreamDecoder(self.tokenizer)
        held = ""  # text held back while it could still be the start of a stop string
        for token in self._token_loop(ids, params, adapters):
            held += decoder.push(token)
            cut = _find_stop(held, params.stop)
            if cut is not None:
                if held[:cut]:
                    yield held[:cut]
                return
            safe = len(held) - _longest_stop_prefix(held, params.stop)
            if safe > 0:
                yield held[:safe]
                held = held[safe:]
        if held:
            yield held

    def _token_loop(self, ids: list[int], params: SamplingParams, adapters) -> Iterator[int]:
        if not ids:
            raise EdgeLoraError("empty prompt")
        self._check_ids(ids)
        chosen, loaded = self._request_set(adapters)
        sampler = Sampler(params)
        state = self._new_state(chosen, loaded)
        eos = set(self.config.eos_token_id) | set(params.stop_token_ids)
        history = list(ids)
        try:
            logits = state.feed(ids)
            for _ in range(params.max_new_tokens):
                token = sampler(logits, history)
                if token in eos:
                    return
                yield token
                history.append(token)
                if len(history) >= self.max_context:
                    return
                logits = state.feed([token])
        finally:
            state.close()

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise EdgeLoraError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if len(ids) > self.max_context:
            raise EdgeLoraError(f"{len(ids)} tokens exceed the context of {self.max_context}", hint="shorten the prompt")

    def info(self) -> dict:
        with self._lock:
            return {
                "backend": self.backend_name,
                "architecture": self.config.architecture,
                "base_fingerprint": self.bundle.base_fingerprint,
                "adapters": {n: {"rank": max(w.rank for w in la.adapter.modules.values()) if la.adapter.modules else 0,
                                 "modules": len(la.adapter.modules), "path": str(la.path)} for n, la in self._adapters.items()},
                "active": dict(self._default_set),
                "merged": dict(self._merged),
                **self._backend_info(),
            }

    # --- backend hooks --------------------------------------------------------------

    @abstractmethod
    def _attach(self, name: str, adapter: Adapter, source: Path) -> object: ...

    def _detach(self, name: str, handle: object) -> None:
        pass

    @abstractmethod
    def _new_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState: ...

    @abstractmethod
    def _full_logits(self, ids: list[int], adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> np.ndarray: ...

    @abstractmethod
    def _merge(self, name: str, loaded: LoadedAdapter, scale: float) -> None: ...

    def _backend_info(self) -> dict:
        return {}


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that begins some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
