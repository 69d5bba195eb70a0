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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle, FileBytes
from edge_lora.config import ModelConfig
from edge_lora.errors import EdgeLoraError
from edge_lora.safetensors_file import MAX_HEADER_BYTES
from edge_lora.signing import AdapterTrust
from edge_lora.targets import linear_modules
from runtime.activation import Segment, activation_plan
from runtime.new_tokens import AddedVocab, combine
from runtime.sampling import Sampler, SamplingParams
from runtime.tokenizer import StreamDecoder, Tokenizer


def max_adapter_bytes(config: ModelConfig) -> int:
    """The most bytes an adapter file for this base can need (float32, every rank at its largest, one
    new-token row per vocabulary entry in both tables): a bigger file is refused before it is read."""
    shapes = linear_modules(config, include_lm_head=True).values()
    linear = sum(4 * (max(o, i) * (o + i) + o) for o, i in shapes)
    return 8 + MAX_HEADER_BYTES + linear + 8 * config.vocab_size * config.hidden_size


@dataclass
class LoadedAdapter:
    name: str
    adapter: Adapter
    path: Path
    handle: object  # the backend's own representation


_ONNX_C_HINT = "run activated adapters on the llama.cpp backend or the ONNX backend's CPU path"


class DecodeState(ABC):
    """One request's decoding state (its KV cache) under one fixed adapter set."""

    @abstractmethod
    def feed(self, token_ids: list[int]) -> np.ndarray:
        """Append tokens; return the logits ``[vocab]`` after the last one."""

    def prefill(self, token_ids: list[int]) -> None:
        """Append tokens whose logits nobody reads (a prompt segment before an activated adapter's)."""
        self.feed(token_ids)

    def feed_all(self, token_ids: list[int]) -> np.ndarray:
        """Append tokens; return the logits ``[len(token_ids), vocab]`` at each of them (evaluation of a
        prompt cut into segments: :meth:`Engine.logits` with activated adapters)."""
        raise EdgeLoraError(f"{type(self).__name__} returns no logits per position", hint=_ONNX_C_HINT)

    def adopt(self, previous: DecodeState) -> None:
        """Continue from ``previous`` (closed here once its positions are this state's): a request goes on
        under a wider adapter set without evaluating them again (activated adapters)."""
        raise EdgeLoraError(
            f"{type(self).__name__} cannot continue another state's KV cache, which activated adapters "
            "(aLoRA) need",
            hint=_ONNX_C_HINT,
        )

    def close(self) -> None:  # noqa: B027 (optional: a state with nothing to free needs none)
        pass


class Engine(ABC):
    backend_name = "base"

    def __init__(
        self, bundle: Bundle | str | os.PathLike, *, verify_hashes: bool = True, trusted_keys: object = None
    ) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.config = self.bundle.config
        self.verify_hashes = verify_hashes
        # trusted_keys=None: no signature checks; a list (even empty) refuses every adapter no trusted key
        # vouches for
        self.trust = None if trusted_keys is None else AdapterTrust(self.bundle, trusted_keys)
        self.tokenizer = Tokenizer(self.bundle.require(self.bundle.tokenizer["tokenizer"]))
        self._adapters: dict[str, LoadedAdapter] = {}
        self._default_set: dict[str, float] = {}
        self._merged: dict[str, float] = {}
        self._lock = threading.RLock()
        self._vocabs: dict[tuple, tuple] = {}  # adapter set (names, ids) -> (its adapters, their AddedVocab)

    # --- adapters -------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | os.PathLike | None = None) -> None:
        """Load an adapter (from the bundle by name, or from an adapter file) without touching the base."""
        with self._lock:
            if name in self._adapters:
                raise EdgeLoraError(
                    f"an adapter named {name!r} is already loaded",
                    hint="remove_adapter() it first or pick another name",
                )
        entry = None
        if path is None:
            entry = self.bundle.adapters.get(name)
            if entry is None:
                raise EdgeLoraError(
                    f"bundle has no adapter {name!r} (has: {', '.join(self.bundle.adapters) or 'none'})",
                    path=self.bundle.root,
                )
            rel = entry["source"]
            source = self.bundle.require(rel)
        else:
            rel, source = None, Path(path)
        # the one read; its hash runs on a thread while the bytes are parsed and handed to the backend
        checked, check = self._read_checked(source, rel, entry)
        try:
            adapter = Adapter.load(
                source,
                base=self.config,
                base_fingerprint=self.bundle.base_fingerprint,
                data=checked.data,
                base_token_id=self.tokenizer.token_to_id,  # a new token the base has: refused (token_rows.py)
            )
            handle = self._attach(name, adapter, source)
        except EdgeLoraError:
            check()  # a hash or signature mismatch wins over the error it may explain
            raise
        try:
            check()  # before anything uses it: the bytes parsed are those bundle.json or a key vouches for
        except BaseException:
            self._detach(name, handle)
            raise
        with self._lock:
            raced = name in self._adapters  # another thread added the same name while this one loaded
            if not raced:
                self._adapters[name] = LoadedAdapter(name, adapter, source, handle)
        if raced:
            self._detach(name, handle)
            raise EdgeLoraError(
                f"an adapter named {name!r} is already loaded",
                hint="remove_adapter() it first or pick another name",
            )

    def _read_checked(
        self, path: Path, rel: str | None, entry: dict | None, **options
    ) -> tuple[FileBytes, Callable[[], None]]:
        """A file of an adapter read once (``rel``: the bundle's name for it; ``options`` as
        :meth:`FileHashes.read`), hashed on a thread, and the check to call before its use: bundle.json's
        hash and a trusted key's signature, both judged on exactly the bytes in hand, so a file changed
        on disk after the check is never used and nothing reads it a second time."""
        verify = rel is not None and self.verify_hashes
        digest = verify or self.trust is not None
        if verify:
            checked = self.bundle.read_verified(rel, background=True, **options)
        else:
            limit = None if rel is not None else max_adapter_bytes(self.config)
            if rel is None and (not path.is_file() or path.stat().st_size > limit):
                # says what is wrong from the path and the header alone (missing, a directory, a PEFT
                # folder, shapes the base cannot use) before anything is read whole
                Adapter.load(path, base=self.config)
            checked = self.bundle.hashes.read(
                path, digest=digest, background=True, max_bytes=limit, **options
            )

        def check() -> None:
            if verify:
                self.bundle.check_digest(rel, checked.sha256)
            if self.trust is not None:
                self.trust.vouch(path, entry, rel, checked.sha256)

        return checked, check

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
            if loaded.adapter.token_rows:  # the base vocabulary is fixed: its new tokens would be lost
                raise EdgeLoraError(
                    f"adapter {name!r} adds tokens or token rows, which a merge into the base cannot keep",
                    hint="run it unmerged, per request",
                )
            if loaded.adapter.activated:  # it acts on part of a prompt: a merge would act on all of it
                raise EdgeLoraError(
                    f"adapter {name!r} is an activated adapter (aLoRA), which no merge can express",
                    hint="run it unmerged, per request",
                )
            self._merge(name, loaded, float(scale))
            self._merged[name] = self._merged.get(name, 0.0) + float(scale)

    def _known(self, name: str) -> str:
        if name not in self._adapters:
            raise EdgeLoraError(
                f"no adapter {name!r} is loaded (loaded: {', '.join(self._adapters) or 'none'})",
                hint="add_adapter() it first",
            )
        return name

    def _resolve(self, adapters: dict[str, float]) -> dict[str, float]:
        with self._lock:
            if not isinstance(adapters, dict):
                raise EdgeLoraError("adapters must be a {name: scale} mapping")
            return {self._known(n): float(s) for n, s in adapters.items() if float(s) != 0.0}

    def _request_set(
        self, adapters: dict[str, float] | None
    ) -> tuple[dict[str, float], dict[str, LoadedAdapter]]:
        """The adapter set of one request and a snapshot of the adapters it uses."""
        with self._lock:
            chosen = dict(self._default_set) if adapters is None else self._resolve(adapters)
            return chosen, {n: self._adapters[n] for n in chosen}

    # --- new tokens -----------------------------------------------------------------

    def added_vocab(self, loaded: dict[str, LoadedAdapter]) -> AddedVocab:
        """The new tokens of a request's adapters (checked for clashes once per set, then cached)."""
        named = sorted((n, la.adapter) for n, la in loaded.items() if la.adapter.token_rows)
        key = tuple((n, id(a)) for n, a in named)
        hit = self._vocabs.get(key)
        if hit is None or any(
            a is not b for (_, a), b in zip(named, hit[0])
        ):  # an id reused by a newer adapter
            hit = (tuple(a for _, a in named), combine(named, self.config))
            if len(self._vocabs) >= 32:
                self._vocabs.clear()
            self._vocabs[key] = hit
        return hit[1]

    def tokenizer_for(self, adapters: dict[str, float] | None = None) -> Tokenizer:
        """The tokenizer a request with these adapters uses: the base one plus their new tokens."""
        _, loaded = self._request_set(adapters)
        vocab = self.added_vocab(loaded)
        return self.tokenizer.with_added(vocab.tokens, vocab.base_vocab)

    # --- inference ------------------------------------------------------------------

    def logits(self, token_ids: Iterable[int], adapters: dict[str, float] | None = None) -> np.ndarray:
        """Full-sequence logits ``[T, vocab]`` (float32) for evaluation."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise EdgeLoraError("logits() needs at least one token")
        chosen, loaded = self._request_set(adapters)
        vocab = self.added_vocab(loaded)
        self._check_ids(ids, vocab.size)
        plan = self._plan(ids, chosen, loaded)
        if len(plan) == 1:
            return vocab.from_model(self._full_logits(vocab.to_model(ids), plan[0].adapters, loaded))
        # activated adapters: each segment under its own set, on the KV of the ones before it
        state, parts = self._new_state(plan[0].adapters, loaded), []
        try:
            for segment in plan:
                if segment.start:
                    state = self._activate(state, segment.adapters, loaded, fresh=True)
                parts.append(state.feed_all(vocab.to_model(ids[segment.start : segment.end])))
        finally:
            state.close()
        return vocab.from_model(np.concatenate(parts))

    def _plan(
        self, ids: list[int], chosen: dict[str, float], loaded: dict[str, LoadedAdapter]
    ) -> list[Segment]:
        return activation_plan(ids, chosen, {n: la.adapter for n, la in loaded.items()})

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        *,
        adapters: dict[str, float] | None = None,
        stream: bool = False,
        **sampling,
    ) -> str | Iterator[str]:
        params = SamplingParams.from_kwargs(max_new_tokens=max_new_tokens, **sampling)
        chunks = self._generate(prompt, params, adapters)
        return chunks if stream else "".join(chunks)

    def generate_ids(
        self, prompt_ids: list[int], params: SamplingParams, adapters: dict[str, float] | None = None
    ) -> list[int]:
        """Token ids out, no text: what tests and benchmarks compare across backends."""
        out: list[int] = []
        for token in self._token_loop(list(prompt_ids), params, adapters):
            out.append(token)
        return out

    def _generate(
        self, prompt: str | list[int], params: SamplingParams, adapters: dict[str, float] | None
    ) -> Iterator[str]:
        tokenizer = self.tokenizer_for(adapters)
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        decoder = StreamDecoder(tokenizer)
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

    def _token_loop(
        self, ids: list[int], params: SamplingParams, adapters: dict[str, float] | None
    ) -> Iterator[int]:
        if not ids:
            raise EdgeLoraError("empty prompt")
        chosen, loaded = self._request_set(adapters)
        vocab = self.added_vocab(loaded)  # ids past its size (padding, replaced-row slots) are never sampled
        self._check_ids(ids, vocab.size)
        sampler = Sampler(params)
        plan = self._plan(ids, chosen, loaded)  # more than one segment: activated adapters (aLoRA)
        state = self._request_state(plan[0].adapters, loaded)
        eos = set(self.config.eos_token_id) | set(params.stop_token_ids)
        history = list(ids)
        try:
            for segment in plan:
                if segment.start:
                    state = self._activate(state, segment.adapters, loaded)
                if segment.end < len(ids):
                    state.prefill(vocab.to_model(ids[segment.start : segment.end]))
                else:
                    logits = state.feed(vocab.to_model(ids[segment.start :]))
            for _ in range(params.max_new_tokens):
                token = sampler(vocab.from_model(logits), history)
                if token in eos:
                    return
                yield token
                history.append(token)
                if len(history) >= self.max_context:
                    return
                logits = state.feed(vocab.to_model([token]))
        finally:
            state.close()

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    def _check_ids(self, ids: list[int], size: int | None = None) -> None:
        size = size or self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < size]
        if bad:
            past_base = bad[0] >= self.config.vocab_size
            hint = "an id past the base vocabulary needs the adapter that adds it" if past_base else None
            raise EdgeLoraError(f"token id {bad[0]} is outside the vocabulary (0..{size - 1})", hint=hint)
        if len(ids) > self.max_context:
            raise EdgeLoraError(
                f"{len(ids)} tokens exceed the context of {self.max_context}", hint="shorten the prompt"
            )

    def info(self) -> dict:
        with self._lock:
            return {
                "backend": self.backend_name,
                "architecture": self.config.architecture,
                "base_fingerprint": self.bundle.base_fingerprint,
                "adapters": {
                    n: {
                        "rank": max(w.rank for w in la.adapter.modules.values()) if la.adapter.modules else 0,
                        "modules": len(la.adapter.modules),
                        "path": str(la.path),
                    }
                    for n, la in self._adapters.items()
                },
                "active": dict(self._default_set),
                "merged": dict(self._merged),
                **self._backend_info(),
            }

    # --- backend hooks --------------------------------------------------------------

    @abstractmethod
    def _attach(self, name: str, adapter: Adapter, source: Path) -> object: ...

    def _detach(self, name: str, handle: object) -> None:  # noqa: B027 (optional: nothing to free)
        pass

    @abstractmethod
    def _new_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState: ...

    def _request_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState:
        """The state a generation runs on: :meth:`_new_state`, which a backend may wrap (the ONNX
        engine's prefix reuse, :class:`runtime.prefix_cache.PrefixReuse`)."""
        return self._new_state(adapter_set, loaded)

    def _activate(
        self,
        state: DecodeState,
        adapter_set: dict[str, float],
        loaded: dict[str, LoadedAdapter],
        fresh: bool = False,
    ) -> DecodeState:
        """The state a request goes on with when more adapters act from here on (activated adapters): by
        default a state of the wider set that takes over ``state``'s KV cache (:meth:`DecodeState.adopt`).
        ``fresh``: no prefix store (evaluation)."""
        new = self._new_state(adapter_set, loaded) if fresh else self._request_state(adapter_set, loaded)
        try:
            new.adopt(state)
        except BaseException:
            new.close()
            raise
        return new

    @abstractmethod
    def _full_logits(
        self, ids: list[int], adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]
    ) -> np.ndarray: ...

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
