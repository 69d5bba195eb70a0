"""The llama.cpp backend: a bundle's GGUF model through llama-cpp-python's low-level API.

Adapters are GGUF LoRAs loaded once on the model (``llama_adapter_lora_init``) and switched per
request with ``llama_set_adapters_lora``: no reload, scales per adapter, several stacked. An
adapter file from outside the bundle is converted into one scratch GGUF that every conversion
rewrites in place (llama.cpp copies the tensors when it loads them). One context serves every
request under a lock; its KV cache is reused only for the prefix that was computed under the same
adapter set, so a swap never reads stale keys and values. ``merge`` writes a merged GGUF
(dequantize, add, requantize) and reloads the model from it. Adapters no GGUF LoRA can express
(DoRA, LoRA on a tied head: ``gguf_adapter.merged_variant_reason``) are merged into a variant of the
base when added, loaded beside it with a context of its own
(:class:`~runtime.llamacpp.adapters.MergedVariant`); requests
with such an adapter run there, alone and at scale 1.

This module holds the engine itself: its construction, the model and context it runs, and the
per-request decode with prefix reuse. Adapters, merged variants and ``merge`` live in
:mod:`runtime.llamacpp.adapters`; the C API's wrappers in :mod:`runtime.llamacpp.lib`,
:mod:`runtime.llamacpp.model` and :mod:`runtime.llamacpp.context`.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.merge import check_precision
from edge_lora.gguf_format.names import FINGERPRINT_KEY
from runtime.devices import CPU, check_device
from runtime.engine import DecodeState, Engine, LoadedAdapter
from runtime.llamacpp import lib
from runtime.llamacpp.adapters import LlamaCppAdapters
from runtime.llamacpp.context import Context
from runtime.llamacpp.model import Model
from runtime.prefix_cache import PrefixCache

DEFAULT_MAX_CTX = 4096
# positions a context starts with; it doubles (up to n_ctx) when a request needs more: llama.cpp zeroes
# its whole KV cache at creation, so a 2048-position f16 cache cost 47 MB of RSS (SmolLM2-135M) whether
# a request used 96 positions or all of them
DEFAULT_START_CTX = 256
# KV prefixes kept across adapter switches (runtime/prefix_cache.py): 64 MiB hold ~2,800 positions of
# SmolLM2-135M's f16 cache (23 KB each), e.g. a 512-token system prompt under five adapter sets
DEFAULT_PREFIX_CACHE_BYTES = 64 << 20


class LlamaCppEngine(LlamaCppAdapters, Engine):
    backend_name = "llamacpp"

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        quant: str | None = None,
        n_gpu_layers: int | None = None,
        threads: int | None = None,
        n_ctx: int | None = None,
        use_extra_bufts: bool | None = None,
        verbose: bool = False,
        verify_hashes: bool = True,
        trusted_keys: object = None,
        precise: bool = False,
        device: str = "cpu",
        n_batch: int = 512,
        n_ubatch: int | None = None,
        mmap: bool | None = None,
        merge_precision: str = "base",
        n_ctx_start: int | None = DEFAULT_START_CTX,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        """``precise``: f32 KV cache, no flash attention (for evaluation: logits within ~1e-5 of
        PyTorch). Memory (docs/mobile.md): the weights are one copy (``mmap=None`` maps the file, or reads it
        when llama.cpp repacks the weights); ``n_ctx`` is the longest context a request may reach; the KV
        cache starts at ``n_ctx_start`` positions and doubles, up to ``n_ctx``, when a request needs
        more (the context is made again and the request's tokens evaluated again: one prefill per
        doubling). ``n_ctx_start=None`` allocates all ``n_ctx`` at load (f16: 90 MB for SmolLM2-135M
        at 4096), as llama.cpp zeroes the whole cache when it makes it;
        ``n_batch`` tokens go into one ``llama_decode``, ``n_ubatch`` (default ``n_batch``) into one
        compute graph, whose buffer llama.cpp reserves for the worst case but touches only as used:
        ``n_ubatch`` 128 instead of 512 saved 3 MB after a 256-token prompt and doubled its prefill time.
        ``use_extra_bufts=None`` decides from the CPU (off on Intel AMX, where it crashed).
        ``device="gpu"`` offloads ``n_gpu_layers`` layers (all by default) to llama.cpp's GPU backend
        (Vulkan, Metal, CUDA: whichever llama-cpp-python was built with); ``device="cpu"`` keeps
        every tensor and op on the CPU even in a GPU build. ``merge_precision``: what ``merge`` (and a
        merged variant) writes a 4/5-bit base's merged tensors as: ``"base"`` its own type, at its speed,
        rounded to keep the adapter (:mod:`edge_lora.gguf_format.merge`); ``"q8_0"`` closer to unmerged,
        slower.
        ``prefix_cache_bytes``: KV prefixes kept across adapter switches (:mod:`runtime.prefix_cache`): a
        request whose set was not the last one's restores the longest prefix of its tokens saved under its
        own set instead of evaluating it again; 0 turns it off."""
        super().__init__(bundle, verify_hashes=verify_hashes, trusted_keys=trusted_keys)
        lib.silence_log(verbose)
        self.device, self._gpus = (CPU, []) if check_device(device) == "cpu" else lib.find_gpu(device)
        if n_gpu_layers and not self._gpus:
            raise EdgeLoraError(
                f"n_gpu_layers={n_gpu_layers} offloads to a GPU, but the engine runs on the CPU",
                hint="pass device='gpu' (all layers by default)",
            )
        entry = self.bundle.backend_entry("gguf", quant)
        rel = entry["model"]
        self.quant = entry.get("quant")
        self._model_path = self.bundle.verify_file(rel) if verify_hashes else self.bundle.require(rel)
        self._precise = bool(precise)
        self._merge_precision = check_precision(merge_precision)
        all_layers = self.config.num_hidden_layers + 1  # the output layer counts as one more
        self._n_gpu_layers = (all_layers if n_gpu_layers is None else int(n_gpu_layers)) if self._gpus else 0
        self._use_extra_bufts = use_extra_bufts
        self._threads = int(threads or os.cpu_count() or 1)
        self._n_ctx = int(n_ctx or min(self.config.max_position_embeddings, DEFAULT_MAX_CTX))
        self._n_ctx_start = min(self._n_ctx, int(n_ctx_start or self._n_ctx))
        self._n_batch, self._n_ubatch, self._mmap = int(n_batch), n_ubatch, mmap
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-lora-llamacpp-")
        # rewriting one file reuses its cached pages: a fresh 20 MB file cost ~3x as much to write
        self._scratch = Path(self._tmp.name) / "converted.gguf"
        self._scratch_lock = threading.Lock()  # taken before _ctx_lock, never inside it
        self._ctx_lock = threading.Lock()  # a llama_context is not thread-safe
        self._model = self._ctx = None
        self._prefixes = PrefixCache(int(prefix_cache_bytes)) if prefix_cache_bytes > 0 else None
        self._evaluated = 0  # positions llama.cpp evaluated (not reused from a cache): info()
        # an adapter added by path is converted with gguf-py, whose import took ~40 ms of the first such
        # add: imported beside the model's load instead, which runs in C with the interpreter released
        threading.Thread(target=_import_gguf_writer, name="edge-lora gguf import", daemon=True).start()
        self._load(self._model_path)

    # --- model and context --------------------------------------------------------------

    def _new_model(self, path: Path) -> Model:
        return Model(
            path,
            devices=self._gpus,
            n_gpu_layers=self._n_gpu_layers,
            use_extra_bufts=self._use_extra_bufts,
            use_mmap=self._mmap,
        )

    def _new_context(self, model: Model, n_ctx: int | None = None) -> Context:
        return Context(
            model,
            n_ctx=n_ctx or self._n_ctx_start,
            threads=self._threads,
            n_batch=self._n_batch,
            n_ubatch=self._n_ubatch,
            precise=self._precise,
        )

    def _load(self, path: Path) -> None:
        model = self._new_model(path)
        try:
            if model.n_vocab != self.config.vocab_size:
                raise EdgeLoraError(
                    f"the GGUF has {model.n_vocab} tokens, bundle.json says {self.config.vocab_size}",
                    path=path,
                    hint="the bundle is inconsistent; re-export it",
                )
            stored = model.meta(FINGERPRINT_KEY)
            if stored is not None and stored != self.bundle.base_fingerprint:
                raise EdgeLoraError(
                    "the GGUF was exported from another base than bundle.json names",
                    path=path,
                    hint="re-export the bundle",
                )
            ctx = self._new_context(model)
        except BaseException:
            model.free()
            raise
        # self._ctx is the context requests run on: the base's, or a merged variant's (see _use_set)
        self._model, self._ctx = model, ctx
        self._base_ctx = ctx
        self._applied: tuple | None = None  # the adapter set llama.cpp applies on self._ctx now
        # one key per cached position: (token, the identity of the adapter set it was evaluated under), so
        # that a request reuses exactly the positions that it would compute alike (runtime.activation)
        self._cache_keys: list[tuple[int, tuple]] = []
        self._last_state: _State | None = None  # the request whose positions the context holds, all of them
        if self._prefixes is not None:
            self._prefixes.clear()  # states of another base (a merge reloads the model)

    def _unload(self) -> None:
        base_ctx = getattr(self, "_base_ctx", None)  # self._ctx may be a merged variant's, freed with it
        if base_ctx is not None:
            base_ctx.free()
        if self._model is not None:
            self._model.free()  # frees every adapter loaded on it too
        self._model = self._ctx = self._base_ctx = None

    def close(self) -> None:
        with self._ctx_lock:
            for loaded in list(self._adapters.values()):
                if loaded.handle.variant is not None:
                    loaded.handle.variant.free()
            self._unload()
        self._tmp.cleanup()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may already be gone
            pass

    @property
    def max_context(self) -> int:
        return self._n_ctx

    # --- inference ------------------------------------------------------------------------

    @property
    def _cache_tokens(self) -> list[int]:
        """The tokens whose keys and values the active context holds."""
        return [t for t, _ in self._cache_keys]

    def _new_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState:
        return _State(self, adapter_set, loaded)

    def _activate(
        self,
        state: DecodeState,
        adapter_set: dict[str, float],
        loaded: dict[str, LoadedAdapter],
        fresh: bool = False,
    ) -> DecodeState:
        """One shared context: the same state goes on, its next positions under the wider set."""
        state.segments.append((len(state.history), dict(adapter_set)))
        return state

    def _full_logits(
        self, ids: list[int], adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]
    ) -> np.ndarray:
        return _State(self, adapter_set, loaded).feed_all(ids)

    def _set_ident(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> tuple:
        """What positions evaluated under ``adapter_set`` depend on: the names, the scales and the very
        adapters loaded (an adapter removed and added again under its name is another one)."""
        key = tuple(sorted(adapter_set.items()))
        return key, tuple(id(loaded[n].handle) for n, _ in key)

    def _use_set(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> None:
        """Apply an adapter set. An adapter that runs as a merged variant switches ``self._ctx`` to the
        variant's context (alone, at scale 1); the cached positions are the other context's then, so they
        go to the prefix store and the context starts empty. Within one context the cache stays: its
        positions' keys say under which set each was evaluated."""
        key = tuple(sorted(adapter_set.items()))
        if key == self._applied:
            return
        ctx = self._set_context(key, loaded)
        if ctx is not self._ctx:
            self._save_prefix()  # the context it leaves: a later request there starts from these positions
            self._forget_cache()
            self._ctx, self._applied = ctx, None
            self._forget_cache()  # it may hold the positions of an earlier request on it
        if ctx is self._base_ctx:
            # an empty handle: an adapter of new tokens only, no tensors for llama.cpp
            used = [(loaded[n].handle.ptr, s) for n, s in key if not loaded[n].handle.empty]
            self._ctx.set_adapters([p for p, _ in used], [s for _, s in used])
        self._applied = key

    def _set_context(self, key: tuple, loaded: dict[str, LoadedAdapter]) -> object:
        """The context a set runs on (the base's, or a merged variant's); refuses a set that cannot run."""
        gone = [
            n
            for n, _ in key
            if loaded[n].handle.ptr is None
            and not loaded[n].handle.empty
            and (loaded[n].handle.variant is None or loaded[n].handle.variant.ctx is None)
        ]
        if gone:
            raise EdgeLoraError(
                f"adapter {', '.join(map(repr, gone))} was removed while this request ran",
                hint="add it again, or retry without it",
            )
        merged = [n for n, _ in key if loaded[n].handle.variant is not None]
        if merged and (len(key) > 1 or key[0][1] != 1.0):
            raise EdgeLoraError(
                f"adapter {merged[0]!r} runs on llama.cpp as a merged variant of the base "
                f"({loaded[merged[0]].handle.variant.reason}): alone and at scale 1.0 only",
                hint="stack or scale it on the ONNX backend, or engine.merge() it into the base",
            )
        return loaded[merged[0]].handle.variant.ctx if merged else self._base_ctx

    def _context_tag(self) -> object:
        """Which model the active context runs: the base (None) or a merged variant (its context)."""
        return None if self._ctx is self._base_ctx else id(self._ctx)

    def _save_prefix(self) -> None:
        """The active context's positions and KV state into the prefix store."""
        if self._prefixes is None or not self._cache_keys:
            return
        blob = self._ctx.save_state()
        if blob is not None:
            self._prefixes.put(self._context_tag(), self._cache_keys, blob, blob.nbytes)

    def _reuse(self, keys: list[tuple[int, tuple]], limit: int) -> int:
        """Bring the context to the longest prefix of ``keys`` (at most ``limit`` positions) that it or the
        prefix store holds; returns its length. Positions dropped that were evaluated under another set
        than the request's (an adapter switch) go to the store first: a later request under that set
        starts from them."""
        cached = self._cache_keys
        common, stop = 0, min(len(cached), limit)
        while common < stop and cached[common] == keys[common]:
            common += 1
        stored = None
        if self._prefixes is not None and common < limit:
            stored = self._prefixes.best(self._context_tag(), keys, limit)
        switched = common < len(cached) and common < len(keys) and cached[common][1] != keys[common][1]
        if switched:
            self._save_prefix()
        if stored is not None and stored[0] > common:
            n, blob = stored
            if self._ctx.load_state(blob) and self._ctx.truncate(n):
                self._cache_keys = list(keys[:n])
                return n
            self._forget_cache()
            return 0
        if common < len(cached) and not self._ctx.truncate(common):
            self._forget_cache()
            return 0
        self._cache_keys = cached[:common]
        return common

    def _make_room(self, needed: int) -> None:
        """Give the active context at least ``needed`` positions (doubling, at most n_ctx): made again,
        its cache empty (its positions in the prefix store, restored by the caller), no adapters applied.
        Beyond n_ctx the decode refuses, saying so."""
        old = self._ctx
        if needed <= old.n_ctx or old.n_ctx >= self._n_ctx:
            return
        size = min(self._n_ctx, max(needed, 2 * old.n_ctx))
        self._save_prefix()
        old.free()  # first: the two caches are never held at once
        try:
            new = self._new_context(old.model, size)
        except EdgeLoraError:
            new = self._new_context(old.model, old.n_ctx)  # keep serving at the old size
        if old is self._base_ctx:
            self._base_ctx = new
        for la in self._adapters.values():
            if la.handle.variant is not None and la.handle.variant.ctx is old:
                la.handle.variant.ctx = new
        self._ctx, self._applied, self._cache_keys = new, None, []

    def _forget_cache(self) -> None:
        self._ctx.clear()
        self._cache_keys, self._last_state = [], None

    def _advance(self, state: _State, fed: int, wanted: str = "last") -> np.ndarray | None:
        """``state.history`` evaluated, reusing the longest prefix the context or the prefix store holds
        under the same sets, the rest segment by segment, each under its own set. Returns the logits
        ``wanted``: after the last position (``"last"``), at each of the last ``fed`` (``"all"``), or
        none (``"none"``: a prompt segment before an activated adapter's)."""
        all_logits = wanted == "all"
        history, loaded = state.history, state.loaded
        with self._ctx_lock:
            # a decode step of the request the context last served: its earlier segments were checked by
            # the call that evaluated them, and their sets are within the last one (adapters only join)
            step = self._last_state is state and not all_logits
            for _, adapter_set in [] if step else state.segments[:-1]:
                self._set_context(tuple(sorted(adapter_set.items())), loaded)  # refuses a gone set, variants
            self._use_set(state.segments[-1][1], loaded)
            self._make_room(len(history))
            keys = state.keys()
            if step and len(self._cache_keys) == len(history) - fed:
                common = len(self._cache_keys)  # the context holds this request's positions: a decode step
            else:
                # evaluate at least the positions whose logits are asked for
                common = self._reuse(keys, len(history) - {"last": 1, "all": fed, "none": 0}[wanted])
            self._last_state = None
            outputs = []
            try:
                for begin, end, adapter_set in state.runs(common):
                    self._use_set(adapter_set, loaded)
                    outputs.append(self._decode(history[begin:end], begin, loaded, all_logits=all_logits))
                    self._cache_keys = keys[:end]
                    self._evaluated += end - begin
            except BaseException:
                self._forget_cache()  # a half-evaluated batch leaves the cache unknown
                raise
            self._last_state = state
            if wanted == "none":
                return None
            if not all_logits:
                return outputs[-1]
            return np.concatenate(outputs)[-fed:]

    def _decode(
        self, ids: list[int], start: int, loaded: dict[str, LoadedAdapter], all_logits: bool = False
    ) -> np.ndarray:
        """The context's decode; with new tokens in the set, their rows go in and their logits come out
        beside the base ones (llama.cpp's vocabulary never changes)."""
        vocab = self.added_vocab(loaded)
        if not vocab.rows:
            return self._ctx.decode(ids, start, all_logits=all_logits)
        return self._ctx.decode_added(ids, start, vocab.embed, vocab.head, all_logits=all_logits)

    def _backend_info(self) -> dict:
        held = {
            n: la.handle.variant
            for n, la in list(self._adapters.items())
            if la.handle.variant is not None and la.handle.variant.ctx is not None
        }
        variants = {
            n: {
                "reason": v.reason,
                "model_file": str(v.path),
                "bytes": v.path.stat().st_size,
                "add_seconds": round(v.add_seconds, 3),
            }
            for n, v in held.items()
        }
        return {
            "quant": self.quant,
            "model_file": str(self._model.path),
            "n_ctx": self._n_ctx,
            "kv_positions": self._ctx.n_ctx,
            "threads": self._threads,
            "merged_variants": variants,
            "n_gpu_layers": self._n_gpu_layers,
            "use_extra_bufts": self._model.use_extra_bufts,
            "precise": self._precise,
            "merge_precision": self._merge_precision,
            "prefix_cache": None
            if self._prefixes is None
            else {
                "max_bytes": self._prefixes.max_bytes,
                "bytes": self._prefixes.nbytes,
                "entries": len(self._prefixes),
                **self._prefixes.stats.as_dict(),
            },
            "evaluated_positions": self._evaluated,
            "mmap": self._model.use_mmap,
            "n_batch": self._base_ctx.n_batch,
            "n_ubatch": self._base_ctx.n_ubatch,
            "device": self.device.describe(),
        }


def _import_gguf_writer() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:  # the conversion says so itself, with a hint, when it is needed
        pass


class _State(DecodeState):
    """A request's tokens and the adapter set each of its segments runs under (one segment unless
    activated adapters join later: :mod:`runtime.activation`); the shared context is brought to them on
    each feed (prefix reuse)."""

    def __init__(
        self, engine: LlamaCppEngine, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]
    ) -> None:
        self.engine, self.loaded = engine, loaded
        self.history: list[int] = []
        self.segments: list[tuple[int, dict[str, float]]] = [(0, dict(adapter_set))]
        self._keys: list[tuple[int, tuple]] = []

    @property
    def adapter_set(self) -> dict[str, float]:
        """The set its next tokens run under."""
        return self.segments[-1][1]

    def keys(self) -> list[tuple[int, tuple]]:
        """Each position's (token, set identity): what its keys and values depend on. Segments only
        start at the end of the history, so the keys of earlier positions never change."""
        done = len(self._keys)
        if done < len(self.history):
            for begin, end, adapter_set in self.runs(done):
                set_id = self.engine._set_ident(adapter_set, self.loaded)
                self._keys += [(t, set_id) for t in self.history[begin:end]]
        return self._keys

    def runs(self, begin: int) -> list[tuple[int, int, dict[str, float]]]:
        """``(start, end, set)`` of the positions from ``begin`` on, one per segment they touch."""
        bounds = [s for s, _ in self.segments[1:]] + [len(self.history)]
        return [
            (max(start, begin), end, adapter_set)
            for (start, adapter_set), end in zip(self.segments, bounds)
            if end > begin and end > start
        ]

    def feed(self, token_ids: list[int]) -> np.ndarray:
        self.history.extend(int(t) for t in token_ids)
        return self.engine._advance(self, len(token_ids))

    def prefill(self, token_ids: list[int]) -> None:
        self.history.extend(int(t) for t in token_ids)
        self.engine._advance(self, len(token_ids), "none")

    def feed_all(self, token_ids: list[int]) -> np.ndarray:
        self.history.extend(int(t) for t in token_ids)
        return self.engine._advance(self, len(token_ids), "all")
