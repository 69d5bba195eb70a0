"""The llama.cpp backend: a bundle's GGUF model through llama-cpp-python's low-level API.

Adapters are GGUF LoRAs loaded once on the model (``llama_adapter_lora_init``) and switched per
request with ``llama_set_adapters_lora``: no reload, scales per adapter, several stacked. An
adapter file from outside the bundle is converted into one scratch GGUF that every conversion
rewrites in place (llama.cpp copies the tensors when it loads them). One context serves every
request under a lock; its KV cache is reused only for the prefix that was computed under the same
adapter set, so a swap never reads stale keys and values. ``merge`` writes a merged GGUF
(dequantize, add, requantize) and reloads the model from it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_adapter import check_llamacpp_can_apply, export_gguf_adapter

from . import llamacpp_lib as lib
from .devices import CPU, check_device
from .engine import DecodeState, Engine, LoadedAdapter

FINGERPRINT_KEY = "edge_lora.base_fingerprint"
DEFAULT_MAX_CTX = 4096


@dataclass
class LoraHandle:
    path: Path | None  # the bundle's GGUF LoRA; None: converted from the adapter (again whenever the model reloads)
    ptr: object = None  # llama_adapter_lora *, replaced when merge reloads the model


class LlamaCppEngine(Engine):
    backend_name = "llamacpp"

    def __init__(self, bundle: Bundle | str | os.PathLike, quant: str | None = None, n_gpu_layers: int | None = None,
                 threads: int | None = None, n_ctx: int | None = None, use_extra_bufts: bool | None = None,
                 verbose: bool = False, verify_hashes: bool = True, trusted_keys=None, precise: bool = False,
                 device: str = "cpu"):
        """``precise``: f32 KV cache, no flash attention (for evaluation: logits within ~1e-5 of PyTorch).
        ``use_extra_bufts=None`` decides from the CPU (off on Intel AMX, where it crashed).
        ``device="gpu"`` offloads ``n_gpu_layers`` layers (all by default) to llama.cpp's GPU backend
        (Vulkan, Metal, CUDA: whichever llama-cpp-python was built with); ``device="cpu"`` keeps
        every tensor and op on the CPU even in a GPU build."""
        super().__init__(bundle, verify_hashes=verify_hashes, trusted_keys=trusted_keys)
        lib.silence_log(verbose)
        self.device, self._gpus = (CPU, []) if check_device(device) == "cpu" else lib.find_gpu(device)
        if n_gpu_layers and not self._gpus:
            raise EdgeLoraError(f"n_gpu_layers={n_gpu_layers} offloads to a GPU, but the engine runs on the CPU",
                                hint="pass device='gpu' (all layers by default)")
        entry = self.bundle.backend_entry("gguf", quant)
        rel = entry["model"]
        self.quant = entry.get("quant")
        self._model_path = self.bundle.verify_file(rel) if verify_hashes else self.bundle.require(rel)
        self._precise = bool(precise)
        all_layers = self.config.num_hidden_layers + 1  # the output layer counts as one more
        self._n_gpu_layers = (all_layers if n_gpu_layers is None else int(n_gpu_layers)) if self._gpus else 0
        self._use_extra_bufts = use_extra_bufts
        self._threads = int(threads or os.cpu_count() or 1)
        self._n_ctx = int(n_ctx or min(self.config.max_position_embeddings, DEFAULT_MAX_CTX))
        self._tmp = tempfile.TemporaryDirectory(prefix="edge-lora-llamacpp-")
        # rewriting one file reuses its cached pages: a fresh 20 MB file cost ~3x as much to write
        self._scratch = Path(self._tmp.name) / "converted.gguf"
        self._scratch_lock = threading.Lock()  # taken before _ctx_lock, never inside it
        self._ctx_lock = threading.Lock()  # a llama_context is not thread-safe
        self._model = self._ctx = None
        self._load(self._model_path)

    # --- model and context --------------------------------------------------------------

    def _load(self, path: Path) -> None:
        model = lib.Model(path, devices=self._gpus, n_gpu_layers=self._n_gpu_layers, use_extra_bufts=self._use_extra_bufts)
        try:
            if model.n_vocab != self.config.vocab_size:
                raise EdgeLoraError(f"the GGUF has {model.n_vocab} tokens, bundle.json says {self.config.vocab_size}", path=path,
                                    hint="the bundle is inconsistent; re-export it")
            stored = model.meta(FINGERPRINT_KEY)
            if stored is not None and stored != self.bundle.base_fingerprint:
                raise EdgeLoraError("the GGUF was exported from another base than bundle.json names", path=path,
                                    hint="re-export the bundle")
            ctx = lib.Context(model, n_ctx=self._n_ctx, threads=self._threads, precise=self._precise)
        except BaseException:
            model.free()
            raise
        self._model, self._ctx = model, ctx
        self._cache_key: tuple | None = None  # adapter set the cached tokens were computed under
        self._cache_tokens: list[int] = []

    def _unload(self) -> None:
        if self._ctx is not None:
            self._ctx.free()
        if self._model is not None:
            self._model.free()  # frees every adapter loaded on it too
        self._model = self._ctx = None

    def close(self) -> None:
        with self._ctx_lock:
            self._unload()
        self._tmp.cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: llama_cpp may already be gone
            pass

    @property
    def max_context(self) -> int:
        return self._n_ctx

    # --- adapters -------------------------------------------------------------------------

    def _attach(self, name: str, adapter: Adapter, source: Path) -> LoraHandle:
        check_llamacpp_can_apply(adapter, self.config, path=source)
        path = self._bundle_gguf(name, source)
        if path is not None:
            with self._ctx_lock:
                return LoraHandle(path, self._model.load_lora(path))
        with self._scratch_lock:  # converted outside the context lock: requests keep decoding meanwhile
            export_gguf_adapter(adapter, self.config, self._scratch, durable=False)  # no fsync: no crash needs it back
            with self._ctx_lock:
                return LoraHandle(None, self._model.load_lora(self._scratch))

    def _reload_lora(self, loaded: LoadedAdapter):
        """Load an adapter again on a new model (after a merge); the caller holds the context lock,
        so a converted one goes through a file of its own, not the scratch file."""
        if loaded.handle.path is not None:
            return self._model.load_lora(loaded.handle.path)
        fd, tmp = tempfile.mkstemp(suffix=".gguf", dir=self._tmp.name)
        os.close(fd)
        try:
            return self._model.load_lora(export_gguf_adapter(loaded.adapter, self.config, Path(tmp), durable=False))
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _bundle_gguf(self, name: str, source: Path) -> Path | None:
        """The bundle's own GGUF of this adapter, when ``source`` is the bundle's adapter file."""
        entry = self.bundle.adapters.get(name) or {}
        if not entry.get("gguf") or not entry.get("source"):
            return None
        if self.bundle.resolve(entry["source"]).resolve() != Path(source).resolve():
            return None
        # a signature vouches for the safetensors source; the GGUF twin is tied to it by bundle.json's hash
        checked = self.verify_hashes or self.trust is not None
        return self.bundle.verify_file(entry["gguf"]) if checked else self.bundle.require(entry["gguf"])

    def _detach(self, name: str, handle: LoraHandle) -> None:
        with self._ctx_lock:
            if self._cache_key and any(n == name for n, _ in self._cache_key):
                self._ctx.set_adapters([], [])
                self._forget_cache()
            self._model.free_lora(handle.ptr)
            handle.ptr = None

    def _merge(self, name: str, loaded: LoadedAdapter, scale: float) -> None:
        from .llamacpp_merge import write_merged_gguf

        with self._ctx_lock:
            merged = Path(self._tmp.name) / f"merged-{len(self._merged)}-{name}.gguf"
            write_merged_gguf(self._model.path, merged, self.config, loaded.adapter, scale)
            previous = self._model.path
            self._unload()
            self._load(merged)
            for other in self._adapters.values():  # adapters live on a model: load them again on the new one
                other.handle.ptr = self._reload_lora(other)
            if previous != self._model_path:
                previous.unlink(missing_ok=True)

    # --- inference ------------------------------------------------------------------------

    def _new_state(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> DecodeState:
        return _State(self, adapter_set, loaded)

    def _full_logits(self, ids: list[int], adapter_set, loaded) -> np.ndarray:
        with self._ctx_lock:
            self._use_set(adapter_set, loaded)
            self._forget_cache()
            logits = self._ctx.decode(ids, 0, all_logits=True)
            self._cache_tokens = list(ids)
            return logits

    def _use_set(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> None:
        """Activate an adapter set; a different set invalidates the whole KV cache."""
        key = tuple(sorted(adapter_set.items()))
        if key == self._cache_key:
            return
        handles = [loaded[n].handle for n, _ in key]
        gone = [n for n, _ in key if loaded[n].handle.ptr is None]
        if gone:
            raise EdgeLoraError(f"adapter {', '.join(map(repr, gone))} was removed while this request ran",
                                hint="add it again, or retry without it")
        self._cache_key = None
        self._forget_cache()
        self._ctx.set_adapters([h.ptr for h in handles], [s for _, s in key])
        self._cache_key = key

    def _forget_cache(self) -> None:
        self._ctx.clear()
        self._cache_tokens = []

    def _advance(self, adapter_set, loaded, history: list[int]) -> np.ndarray:
        """Logits after ``history``, reusing the cached prefix computed under the same adapter set."""
        with self._ctx_lock:
            self._use_set(adapter_set, loaded)
            cached = self._cache_tokens
            common = 0
            limit = min(len(cached), len(history) - 1)  # always evaluate at least one token for its logits
            while common < limit and cached[common] == history[common]:
                common += 1
            if common < len(cached) and not self._ctx.truncate(common):
                self._ctx.clear()
                common = 0
            self._cache_tokens = cached[:common]
            try:
                logits = self._ctx.decode(history[common:], common)
            except BaseException:
                self._forget_cache()  # a half-evaluated batch leaves the cache unknown
                raise
            self._cache_tokens = list(history)
            return logits

    def _backend_info(self) -> dict:
        return {"quant": self.quant, "model_file": str(self._model.path), "n_ctx": self._n_ctx, "threads": self._threads,
                "n_gpu_layers": self._n_gpu_layers, "use_extra_bufts": self._model.use_extra_bufts, "precise": self._precise,
                "device": self.device.describe()}


class _State(DecodeState):
    """A request's tokens; the shared context is brought to them on each feed (prefix reuse)."""

    def __init__(self, engine: LlamaCppEngine, adapter_set, loaded):
        self.engine, self.adapter_set, self.loaded = engine, dict(adapter_set), loaded
        self.history: list[int] = []

    def feed(self, token_ids: list[int]) -> np.ndarray:
        self.history.extend(int(t) for t in token_ids)
        return self.engine._advance(self.adapter_set, self.loaded, self.history)
