"""Adapters on the llama.cpp engine: GGUF LoRAs loaded once on the model (the bundle's own file,
pinned and hash-checked, or a conversion written to a scratch file), merged variants of the base
for adapters no GGUF LoRA can express (:class:`MergedVariant`), and ``merge``, which reloads the
model from a merged GGUF and loads every adapter again on it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge_lora.adapter import Adapter
from edge_lora.bundle import VARIANTS_KEY
from edge_lora.errors import EdgeLoraError
from edge_lora.gguf_format.lora_adapter import (
    check_llamacpp_can_apply,
    export_gguf_adapter,
    merged_variant_reason,
)
from runtime.engine import LoadedAdapter
from runtime.private_file import private_file


@dataclass
class MergedVariant:
    """A copy of the base with one adapter merged in, for adapters stock llama.cpp LoRA cannot apply
    (DoRA, LoRA on a tied head): its own model and context, made when the adapter is added."""

    reason: str
    path: Path
    model: object
    ctx: object
    add_seconds: float
    shipped: bool = False  # the bundle's own file (export --gguf-merged-variants): never deleted

    def free(self) -> None:
        if self.ctx is not None:
            self.ctx.free()
            self.model.free()
        self.ctx = self.model = None
        if not self.shipped:
            self.path.unlink(missing_ok=True)


@dataclass
class LoraHandle:
    path: (
        Path | None
    )  # the bundle's GGUF LoRA; None: converted from the adapter (again whenever the model reloads)
    ptr: object = None  # llama_adapter_lora *, replaced when merge reloads the model
    empty: bool = False  # only new tokens, no LoRA tensors: nothing to load into llama.cpp
    variant: MergedVariant | None = None  # instead of ptr: the adapter runs as a merged copy of the base


class LlamaCppAdapters:
    """The adapter half of :class:`~runtime.llamacpp.backend.LlamaCppEngine` (mixed into it). Uses
    the engine's ``_model``, ``_tmp`` (scratch and variant files), ``_scratch`` under
    ``_scratch_lock``, ``_ctx_lock``, and its model and context hooks (``_new_model``,
    ``_new_context``, ``_load``, ``_unload``, ``_forget_cache``)."""

    def _attach(self, name: str, adapter: Adapter, source: Path) -> LoraHandle:
        reason = merged_variant_reason(adapter, self.config)
        if reason:
            shipped = self._shipped_variant(name, source, reason)
            if shipped is not None:
                return LoraHandle(None, variant=shipped)
            with self._scratch_lock:  # merged outside the context lock: requests keep decoding meanwhile
                return LoraHandle(None, variant=self._make_variant(name, adapter, reason))
        check_llamacpp_can_apply(adapter, self.config, path=source)
        if not adapter.modules:  # new tokens alone: their rows are fed per request (_decode)
            return LoraHandle(None, empty=True)
        rel = self._bundle_gguf(name, source)
        if rel is not None:
            return LoraHandle(self.bundle.resolve(rel), self._load_checked_lora(name, rel))
        with self._scratch_lock:  # converted outside the context lock: requests keep decoding meanwhile
            export_gguf_adapter(
                adapter, self.config, self._scratch, durable=False
            )  # no fsync: no crash needs it back
            with self._ctx_lock:
                return LoraHandle(None, self._model.load_lora(self._scratch))

    def _make_variant(self, name: str, adapter: Adapter, reason: str) -> MergedVariant:
        """The current base with ``adapter`` merged in at scale 1, loaded as a model of its own."""
        from edge_lora.gguf_format.merge import write_merged_gguf

        start = time.perf_counter()
        path = Path(self._tmp.name) / f"variant-{name}-{os.urandom(4).hex()}.gguf"
        write_merged_gguf(self._model.path, path, self.config, adapter, 1.0, self._merge_precision)
        model = self._new_model(path)
        try:
            ctx = self._new_context(model)
        except BaseException:
            model.free()
            path.unlink(missing_ok=True)
            raise
        return MergedVariant(reason, path, model, ctx, time.perf_counter() - start)

    def _shipped_variant(self, name: str, source: Path, reason: str) -> MergedVariant | None:
        """The bundle's own merged variant of this adapter for the engine's GGUF base (export
        --gguf-merged-variants), hash-checked and vouched for like the adapter's other files; None when
        the bundle ships none or the base was merged into since (a variant of the old base)."""
        entry = self.bundle.adapters.get(name) or {}
        variants = entry.get(VARIANTS_KEY)
        if self._merged or not isinstance(variants, dict) or self.quant not in variants:
            return None
        own = entry.get("source") and self.bundle.resolve(entry["source"]).resolve() == Path(source).resolve()
        if not own:
            return None  # added from a file of its own, not the bundle's adapter
        start = time.perf_counter()
        rel = variants[self.quant]
        path = self.bundle.require(rel)
        if self.verify_hashes or self.trust is not None:
            digest = self.bundle.hashes.sha256(path)
            if self.verify_hashes:
                self.bundle.check_digest(rel, digest)
            if self.trust is not None:
                self.trust.vouch(path, entry, rel, digest)
        model = self._new_model(path)
        try:
            ctx = self._new_context(model)
        except BaseException:
            model.free()
            raise
        return MergedVariant(reason, path, model, ctx, time.perf_counter() - start, shipped=True)

    def _reload_lora(self, loaded: LoadedAdapter) -> object:
        """Load an adapter again on a new model (after a merge); the caller holds the context lock,
        so a converted one goes through a file of its own, not the scratch file."""
        if loaded.handle.empty:
            return None
        if loaded.handle.path is not None:
            rel = self._bundle_gguf(loaded.name, loaded.path)
            return self._load_checked_lora(loaded.name, rel, locked=True)
        fd, tmp = tempfile.mkstemp(suffix=".gguf", dir=self._tmp.name)
        os.close(fd)
        try:
            return self._model.load_lora(
                export_gguf_adapter(loaded.adapter, self.config, Path(tmp), durable=False)
            )
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _bundle_gguf(self, name: str, source: Path) -> str | None:
        """The bundle's name for its own GGUF of this adapter, when ``source`` is the bundle's adapter."""
        entry = self.bundle.adapters.get(name) or {}
        if not entry.get("gguf") or not entry.get("source"):
            return None
        if self.bundle.resolve(entry["source"]).resolve() != Path(source).resolve():
            return None
        return entry["gguf"]

    def _load_checked_lora(self, name: str, rel: str, locked: bool = False) -> object:
        """The bundle's GGUF LoRA copied once into a private in-memory file and hashed on a thread
        while llama.cpp loads that same copy: what llama.cpp parses is what bundle.json's hash (or a
        trusted key) vouches for, whatever happens to the file on disk; freed again if it is not.
        ``locked``: the caller holds the context lock (a reload after a merge). With no check asked for
        (``verify_hashes=False``, no trusted keys) there is nothing to pin: llama.cpp reads the file."""
        if not (self.verify_hashes or self.trust is not None):
            with contextlib.nullcontext() if locked else self._ctx_lock:
                return self._model.load_lora(self.bundle.require(rel))
        with private_file(self._tmp.name, "lora") as (fd, path):
            entry = self.bundle.adapters.get(name)
            _, check = self._read_checked(self.bundle.resolve(rel), rel, entry, into_fd=fd)
            with contextlib.nullcontext() if locked else self._ctx_lock:
                try:
                    ptr = self._model.load_lora(path)
                except EdgeLoraError as err:
                    check()  # a hash mismatch wins over the load error it may explain
                    raise EdgeLoraError(err.message, path=self.bundle.resolve(rel), hint=err.hint) from None
                try:
                    check()
                except BaseException:
                    self._model.free_lora(ptr)
                    raise
        return ptr

    def _detach(self, name: str, handle: LoraHandle) -> None:
        with self._ctx_lock:
            if self._prefixes is not None:  # states computed with it: never restored again
                self._prefixes.drop(lambda entry: any(id(handle) in ident[1] for _, ident in entry[1]))
            if any(id(handle) in ident[1] for ident in {ident for _, ident in self._cache_keys}):
                self._forget_cache()
            if self._applied and any(n == name for n, _ in self._applied):
                self._forget_cache()
                # off a merged variant about to be freed
                self._ctx, self._applied = self._base_ctx, None
                self._ctx.set_adapters([], [])
                self._forget_cache()
            if handle.variant is not None:
                handle.variant.free()
            if handle.ptr is not None:
                self._model.free_lora(handle.ptr)
            handle.ptr = None

    def _merge(self, name: str, loaded: LoadedAdapter, scale: float) -> None:
        from edge_lora.gguf_format.merge import write_merged_gguf

        with self._ctx_lock:
            merged = Path(self._tmp.name) / f"merged-{len(self._merged)}-{name}.gguf"
            write_merged_gguf(
                self._model.path, merged, self.config, loaded.adapter, scale, self._merge_precision
            )
            previous = self._model.path
            self._unload()
            self._load(merged)
            for other in self._adapters.values():  # adapters live on a model: load them again on the new one
                if other.handle.variant is not None:  # a merged variant is remade from the new base
                    other.handle.variant.free()
                    reason = other.handle.variant.reason
                    other.handle.variant = self._make_variant(other.name, other.adapter, reason)
                    continue
                other.handle.ptr = self._reload_lora(other)
            if previous != self._model_path:
                previous.unlink(missing_ok=True)
