"""The ONNX Runtime backend: one exported decoder, adapters as feeds of its LoRA slots.

One session at a time on the CPU, so one copy of the prepacked weights per process: until the
first adapter is added ``model.plain.onnx`` (no LoRA nodes) runs at the base's own speed; the first
adapter replaces it with ``model.onnx`` (a LoRA side path on every linear layer), which then runs
every request, those without adapters through its rank-0 defaults (1-5% slower per step than the
plain graph, SmolLM2-135M and Qwen2.5-0.5B int4, 2026-11-28; 7-11% in an earlier measurement). ``plain_session=True`` (the GPU's default) keeps both sessions, at the cost
of a second copy of the weights; ``False`` opens only the LoRA one. An adapter set becomes one dict
of OrtValues (ranks concatenated, scales folded into B),
built once and cached, so a swap between requests is a dict lookup and never reloads a session;
each request carries its own dict, so concurrent requests with other sets are not disturbed.
``merge`` dequantizes, adds and requantizes the touched weights and reopens the sessions with
those initializers overridden: zero per-token cost afterwards.

Decoding on the fast variant (GroupQueryAttention) on CPU runs through an IOBinding with the KV
cache in preallocated buffers that GroupQueryAttention updates in place (:class:`SharedKVState`);
the portable variant (Concat KV cache) and device providers hand new KV OrtValues from one run to
the next (:class:`OnnxState`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_lora.adapter import Adapter
from edge_lora.bundle import Bundle
from edge_lora.errors import EdgeLoraError, first_line
from edge_lora.onnx_format import lora_feeds, names
from edge_lora.onnx_format.layout import read_layout
from edge_lora.onnx_format.weight_store import WeightStore
from runtime.devices import CPU, check_device
from runtime.engine import DecodeState, Engine, LoadedAdapter
from runtime.mapped_pages import release_pages, trim_heap
from runtime.onnx_device import DEVICE_LOCK, WEBGPU, DeviceTensors, find_webgpu, node_placement

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
LORA_DTYPES = {"float32": np.float32, "float16": np.float16}
SET_CACHE_SIZE = 8
# providers whose kernels read device memory: a CPU buffer bound as both past and present is not
# one buffer to them, so those sessions keep the Concat-style state
DEVICE_PROVIDERS = {"CUDAExecutionProvider", "WebGpuExecutionProvider"}
KV_BLOCK = 256  # a shared KV cache starts at the first feed rounded up to this, then doubles


def resolve_providers(provider: str | list[str]) -> list[str]:
    """Execution provider names (ours or ONNX Runtime's) -> those available here, CPU always last."""
    import onnxruntime as ort

    wanted = [provider] if isinstance(provider, str) else list(provider)
    available = set(ort.get_available_providers())
    chosen = []
    for name in wanted:
        full = PROVIDERS.get(name.lower(), name)
        if full not in PROVIDERS.values():
            raise EdgeLoraError(
                f"unknown execution provider {name!r}", hint=f"choose from {', '.join(PROVIDERS)}"
            )
        if full in available:
            chosen.append(full)
        else:
            warnings.warn(
                f"execution provider {name!r} ({full}) is not available in this onnxruntime build; "
                f"falling back to CPU (available: {', '.join(sorted(available))})",
                RuntimeWarning,
                stacklevel=3,
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxEngine(Engine):
    """A bundle's ONNX model on ONNX Runtime.

    ``spin=True`` (ONNX Runtime's default) lets idle intra-op threads spin for the next op: the
    fastest decode on a CPU the engine has to itself. ``spin=False`` puts them to sleep instead,
    the choice for a CPU shared with other busy processes (spinning threads then fight them for
    cores) or for a battery.
    """

    backend_name = "onnx"

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        quant: str | None = None,
        variant: str | None = None,
        provider: str | list[str] = "cpu",
        threads: int | None = None,
        verify_hashes: bool = True,
        plain_session: bool | None = None,
        spin: bool = True,
        trusted_keys=None,
        device: str = "cpu",
        profile_dir: str | os.PathLike | None = None,
    ):
        """``device="gpu"`` runs on ONNX Runtime's WebGPU provider with the KV cache and the LoRA
        feeds resident on the device (``auto``: a hardware GPU if there is one, else the CPU);
        ``provider`` names other execution providers (xnnpack, coreml, nnapi, ...) for the CPU path.
        ``profile_dir``: ONNX Runtime's per-node profile of every session, written there by
        :meth:`end_profiling` (which provider ran each node, for how long, and every device copy).
        ``plain_session``: ONNX Runtime prepacks the weights per session and cannot share them from
        Python, so each session is a copy of the weights. ``None`` (the CPU's default): the plain
        session until the first adapter is added, then the LoRA session alone; ``True`` (the GPU's
        default): both, base-only requests at the plain graph's speed; ``False``: the LoRA one alone."""
        super().__init__(bundle, verify_hashes=verify_hashes, trusted_keys=trusted_keys)
        import onnxruntime as ort

        self._ort = ort
        self.device, ep_device = CPU, None
        if check_device(device) != "cpu":
            if provider not in ("cpu", ["cpu"]):
                raise EdgeLoraError(
                    f"device={device!r} and provider={provider!r} both choose where to run",
                    hint="give one: device='gpu' is ONNX Runtime's WebGPU provider",
                )
            self.device, ep_device = find_webgpu(ort, device)
        # the GPU runs the fast variant (its contrib ops have WebGPU kernels); the portable one is for NNAPI/CoreML/XNNPACK
        if (
            ep_device is not None
            and variant is None
            and any(e.get("variant") == "fast" for e in self.bundle.backends.get("onnx") or [])
        ):
            variant = "fast"
        self.entry = self.bundle.backend_entry("onnx", quant, variant)
        model_rel = self.entry["model"]
        folder = model_rel.rsplit("/", 1)[0] + "/" if "/" in model_rel else ""
        self.model_path = self._checked(model_rel)
        self.layout = read_layout(self._checked(folder + names.LAYOUT_FILE))
        # the weights file (most of the bundle's bytes) is hashed on a thread while ONNX Runtime
        # loads it, not before: the engine is refused before it returns if the hash does not match
        data_rel = folder + self.layout["data_file"]
        self.data_path = self.bundle.require(data_rel)
        data_check = _Background(lambda: self._checked(data_rel))
        data_check.start()
        plain = self.layout.get("plain_model")
        # None on the CPU: the plain session only until the first adapter (one session at a time)
        self._plain_until_adapter = plain_session is None and ep_device is None
        self.plain_path = self._checked(folder + plain) if plain and plain_session is not False else None
        self.slots = {m: tuple(s) for m, s in self.layout["lora_slots"].items()}
        self.lora_dtype = LORA_DTYPES[self.layout.get("lora_dtype", "float32")]
        self._ep_device = ep_device
        self.gpu = DeviceTensors(ort, ep_device) if ep_device is not None else None
        if self.gpu and self.layout["variant"] != "fast":
            raise EdgeLoraError(
                f"the {self.layout['variant']} ONNX variant does not run on the GPU path",
                path=self.model_path,
                hint="export the fast variant (--onnx-variant fast) or run on device='cpu'",
            )
        self.providers = [WEBGPU, "CPUExecutionProvider"] if self.gpu else resolve_providers(provider)
        self.threads = threads
        self.spin = spin
        self.profile_dir = Path(profile_dir) if profile_dir else None
        if self.profile_dir:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
        self._profiled: list = []  # sessions opened with profiling on
        self.shared_kv = self.layout["variant"] == "fast" and (
            self.gpu is not None or not DEVICE_PROVIDERS & set(self.providers)
        )
        self._gpu_pads: dict[
            str, object
        ] = {}  # LoRA input -> rank-1 zeros on the device (never a zero-size tensor there)
        self._no_adapters: dict = {}  # the empty set's device feeds (pads only), when there is no plain session
        self._upload_lock = threading.Lock()
        c = self.config
        self.cache_names = [
            pair
            for i in range(c.num_hidden_layers)
            for pair in (
                (names.past_key(i), names.present_key(i)),
                (names.past_value(i), names.present_value(i)),
            )
        ]
        self.mask_ones = np.ones(
            (1, self.max_context), np.int64
        )  # attention masks are slices of it (read-only)
        self.weights = WeightStore(self.layout, self.data_path)
        # merged weights: initializer name -> (array, OrtValue borrowing it); a session keeps the
        # snapshot it was opened with alive, since ORT reads the buffers for the session's lifetime
        self._overrides: dict[str, tuple[np.ndarray, object]] = {}
        self._set_cache: OrderedDict[tuple, dict] = OrderedDict()
        self._cache_lock = threading.Lock()
        try:
            self._open_sessions()
        finally:
            data_check.result()  # a mismatch raises here, and wins over a load error it may explain
        if not self.gpu:  # nothing else runs yet: DONTNEED is safe too where the kernel lacks PAGEOUT
            release_pages(self.data_path, quiet=True)

    def _checked(self, rel: str) -> Path:
        return self.bundle.verify_file(rel) if self.verify_hashes else self.bundle.require(rel)

    # --- sessions -------------------------------------------------------------------

    def _session(self, path: Path, overrides: dict):
        ort = self._ort
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the LoRA inputs that are also initializers warn by design
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        if overrides and self.gpu:
            # the WebGPU plugin reads the file's initializers and ignores add_initializer (a merge
            # changed nothing there); replacing the external data before the graph is built works
            options.add_external_initializers(list(overrides), [value for _, value in overrides.values()])
        else:
            for name, (_, value) in overrides.items():
                options.add_initializer(name, value)
        # ORT 1.32's QDQ selector transformer reads the file's initializer, not an override: with
        # a merged QDQ weight it would silently run the unmerged one (checked in the tests)
        disabled = (
            ["QDQSelectorActionTransformer"] if overrides and self.layout["variant"] == "portable" else []
        )
        if not self.gpu and self.layout["variant"] == "fast":
            # folding the tied embedding's Reshape of lm_head's int4 weight copies that table (0.5B: 85 MB);
            # unfolded, the CPU Reshape aliases its input (no copy per run; decode speed measured equal)
            disabled.append("ConstantFolding")
        if self.profile_dir:
            options.enable_profiling = True
            options.profile_file_prefix = str(self.profile_dir / path.stem)
        providers = self.providers
        if self.gpu:
            options.add_provider_for_devices([self._ep_device], {})
            options.add_session_config_entry(
                "session.record_ep_graph_assignment_info", "1"
            )  # for placement()
            providers = None
        try:
            with DEVICE_LOCK if self.gpu else contextlib.nullcontext():
                session = ort.InferenceSession(
                    str(path), sess_options=options, providers=providers, disabled_optimizers=disabled
                )
        except Exception as err:  # ORT raises its own exception types for every load failure
            raise EdgeLoraError(
                f"ONNX Runtime cannot load the model ({first_line(err)})",
                path=path,
                hint="re-export the bundle, or upgrade onnxruntime",
            ) from None
        session.edge_lora_overrides = overrides
        if not self.gpu:  # the data file's pages ORT touched to prepack: out (runtime.mapped_pages)
            release_pages(self.data_path)
            trim_heap()  # and what a freed session (a plain one whose last request ended) left in the heap
        if self.profile_dir:
            self._profiled.append(session)
        return session

    def end_profiling(self) -> list[Path]:
        """Write the profiles of the sessions opened with ``profile_dir`` (ONNX Runtime's JSON trace) and return their paths."""
        done, self._profiled = self._profiled, []
        return [Path(s.end_profiling()) for s in done]

    def _open_sessions(self) -> None:
        """The plain session now, the LoRA one in the background when the first adapter is added (ORT
        releases the GIL while it initializes), so the first base-only token does not wait for, or
        share the CPU with, its load. Only the LoRA session, opened now, with ``plain_session=False``
        or when adapters are loaded on a CPU engine that holds one session at a time."""
        overrides = dict(
            self._overrides
        )  # a snapshot: later merges must not change it under a loading session
        if not self.plain_path or (self._plain_until_adapter and self._adapters):
            self.plain_session = None
            session = self._session(self.model_path, overrides)
            self._lora = _Background(lambda: session)
            self.output_names = [o.name for o in self.lora_session.get_outputs()]
            self._note_logits_to_keep(self.lora_session)
            return
        self._lora = _Background(lambda: self._session(self.model_path, overrides))
        if self._adapters:  # reopened after a merge with adapters loaded: they will want it soon
            self._lora.start()
        self.plain_session = self._session(self.plain_path, overrides)
        self.output_names = [o.name for o in self.plain_session.get_outputs()]
        self._note_logits_to_keep(self.plain_session)

    def _note_logits_to_keep(self, session) -> None:
        """Bundles from before ``logits_to_keep`` lack the input; then every position gets logits."""
        self.keeps_last = names.LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}
        self.keep_one = self._ort.OrtValue.ortvalue_from_numpy(np.array(1, dtype=np.int64))
        self.keep_all = self._ort.OrtValue.ortvalue_from_numpy(np.array(0, dtype=np.int64))

    @property
    def lora_session(self):
        return self._lora.result()

    def prepare_for_adapters(self) -> None:
        """Open the LoRA session now and wait for it, so that the first request with an adapter does
        not (an app calls it at startup, off the request path); on a CPU engine that holds one
        session at a time, base-only requests move to it from here on."""
        self._start_lora()
        self._lora.result()

    def _start_lora(self) -> None:
        if self._plain_until_adapter and self.plain_session is not None:
            # one copy of the weights: base-only requests move to the LoRA graph at rank 0 (those running
            # keep the plain session alive until they end); dropped before the LoRA one loads, so the
            # two copies never coexist (the process's peak). Freed on this thread, its memory would stay
            # in this thread's malloc arena while the LoRA session allocates in the loading thread's.
            self.plain_session = None
            trim_heap()
        self._lora.start()

    # --- adapters -------------------------------------------------------------------

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

    def _merge(self, name: str, loaded: LoadedAdapter, scale: float) -> None:
        self._lora.wait()  # let a session still opening in the background finish first
        replaced = self.weights.merge(loaded.adapter, scale)
        for tensor, array in replaced.items():
            array = np.ascontiguousarray(array)
            if self.layout["tensors"][tensor]["dtype"] == "int4":
                array = self._int4_ortvalue_source(array)
                value = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, 22)  # TensorProto.INT4
            else:
                value = self._ort.OrtValue.ortvalue_from_numpy(array)
            self._overrides[tensor] = (array, value)
        # DoRA norms are of the weights the layer now holds (PEFT: the merged base); cached sets hold old ones
        for other in list(self._adapters.values()):
            if other.handle.get("dora"):
                other.handle["norms"] = self._dora_norms(other.adapter, other.path)
        if any(la.handle.get("dora") for la in self._adapters.values()):
            with self._cache_lock:
                self._set_cache.clear()
        self._open_sessions()

    @staticmethod
    def _int4_ortvalue_source(values: np.ndarray) -> np.ndarray:
        """A buffer for an INT4 OrtValue: ORT takes the shape from the array and reads the packed
        bytes from its start, so the array has the logical shape and holds the nibbles up front."""
        from edge_lora.onnx_format.weight_quant import pack_int4

        packed = np.frombuffer(pack_int4(values), dtype=np.uint8)
        buffer = np.zeros(values.shape, dtype=np.uint8)
        buffer.reshape(-1)[: packed.size] = packed
        return buffer

    # --- inference ------------------------------------------------------------------

    def _pick(self, adapter_set: dict[str, float], loaded: dict[str, LoadedAdapter]) -> _Choice:
        """The session, LoRA feeds and run options for one request's adapter set."""
        if not adapter_set:
            if self.plain_session or not self.gpu:
                return _Choice(self.plain_session or self.lora_session, {})
            return _Choice(self.lora_session, self._on_device(self._no_adapters, {}))
        entry = self._feeds_for(adapter_set, loaded)
        return _Choice(
            self.lora_session, self._on_device(entry, entry["values"]) if self.gpu else entry["values"]
        )

    def _new_state(self, adapter_set, loaded) -> DecodeState:
        choice = self._pick(adapter_set, loaded)
        return SharedKVState(self, choice) if self.shared_kv else OnnxState(self, choice)

    def _full_logits(self, ids, adapter_set, loaded) -> np.ndarray:
        state = self._new_state(adapter_set, loaded)
        try:
            return state.run(ids)[0, :, :].copy()
        finally:
            state.close()

    def _backend_info(self) -> dict:
        device = self.device.describe()
        if self.gpu:
            device.update(provider=WEBGPU, resident_lora_bytes=self._resident_lora_bytes(), **self.gpu.info())
        return {
            "quant": self.layout["quant"],
            "variant": self.layout["variant"],
            "providers": self.providers,
            "plain_session": self.plain_session is not None,
            "device": device,
        }

    def _resident_lora_bytes(self) -> int:
        """Bytes of LoRA tensors the engine holds on the device: cached sets (single adapters too), pads."""
        with self._cache_lock:
            holders = [*self._set_cache.values(), self._no_adapters]
        values = {id(v): v for h in holders for v in (h.get("device") or {}).values()}
        values.update({id(v): v for v in self._gpu_pads.values()})
        return sum(v.tensor_size_in_bytes() for v in values.values())

    def placement(self) -> dict[str, dict[str, list[tuple[str, str]]]]:
        """Which provider runs each node, per session (``plain``, ``lora``): ``{session: {provider:
        [(op_type, node), ...]}}``. Recorded on the GPU path only (the CPU path has one provider)."""
        if not self.gpu:
            return {}
        sessions = {"plain": self.plain_session, "lora": self.lora_session}
        return {k: node_placement(s) for k, s in sessions.items() if s is not None}


class _Background:
    """A session (or a check) run on demand: ``start()`` begins it on a thread (once), ``result()``
    waits for it (starting it here if nobody did) and re-raises its EdgeLoraError."""

    def __init__(self, open_session):
        self._open, self._value, self._error = open_session, None, None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                # not a daemon: interpreter shutdown must wait for it, or ORT aborts the process mid-load
                self._thread = threading.Thread(target=self._run, daemon=False)
                self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._open()
        except EdgeLoraError as err:
            self._error = err
        finally:
            self._done.set()

    def wait(self) -> None:
        """Wait for a load already under way; start none."""
        with self._lock:
            started = self._thread is not None
        if started:
            self._done.wait()

    def result(self):
        self.start()
        self._done.wait()
        if self._error:
            raise self._error
        return self._value


@dataclass
class _Choice:
    """What one request runs: a session, the LoRA inputs fixed for the request, and either run
    options with an active ``LoraAdapter`` or ``owner``, which keeps the memory behind ``lora`` alive."""

    session: object
    lora: dict
    run_options: object = None
    owner: object = None


def _added_rows(lora: dict) -> int:
    """How many new-token rows a request feeds (numpy arrays or OrtValues), past the table's zero row."""
    rows = lora.get(names.ADDED_EMBED_ROWS)
    if rows is None:
        return 0
    shape = rows.shape() if callable(rows.shape) else rows.shape
    return int(shape[0]) - 1


def _logit_columns(engine: OnnxEngine, choice: _Choice) -> tuple[int, int]:
    """``(new-token rows fed, logits width)`` of a request: one logit per row after the base vocabulary."""
    rows = _added_rows(choice.lora)
    return rows, engine.config.vocab_size + rows


def _decode_error(engine: OnnxEngine, err: Exception) -> EdgeLoraError:
    return EdgeLoraError(f"ONNX Runtime failed during decoding ({first_line(err)})", path=engine.model_path)


class OnnxState(DecodeState):
    """One sequence's KV cache (OrtValues handed from one run to the next) under one adapter set:
    the portable variant's Concat cache, and any variant on a device provider."""

    def __init__(self, engine: OnnxEngine, choice: _Choice):
        self.engine, self.session, self.lora, self.run_options = (
            engine,
            choice.session,
            choice.lora,
            choice.run_options,
        )
        self._owner = choice.owner
        c = engine.config
        ort = engine._ort
        empty = np.zeros((1, c.num_key_value_heads, 0, c.head_dim), np.float32)
        self._empty = empty
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty)] * (2 * c.num_hidden_layers)
        self.length = 0
        self.output_names = engine.output_names
        self.added, _ = _logit_columns(engine, choice)  # new-token rows fed

    def run(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        """Run ``token_ids`` after the cached ones; returns logits ``[1, len(token_ids), vocab]``
        (``[1, 1, vocab]`` with ``last_only``: the head then skips the other positions)."""
        ort, c = self.engine._ort, self.engine.config
        ids = np.asarray([token_ids], dtype=np.int64)
        mask = np.ones((1, self.length + ids.shape[1]), dtype=np.int64)
        feeds = {
            names.INPUT_IDS: ort.OrtValue.ortvalue_from_numpy(ids),
            names.ATTENTION_MASK: ort.OrtValue.ortvalue_from_numpy(mask),
        }
        if self.added:  # new tokens in the set: base ids clamped, and each position's row of the table
            ids, index = lora_feeds.split_added_ids(ids, c.vocab_size)
            feeds[names.INPUT_IDS] = ort.OrtValue.ortvalue_from_numpy(ids)
            feeds[names.ADDED_INDEX] = ort.OrtValue.ortvalue_from_numpy(index)
        for i in range(c.num_hidden_layers):
            feeds[names.past_key(i)] = self.past[2 * i]
            feeds[names.past_value(i)] = self.past[2 * i + 1]
        feeds.update(self.lora)
        if last_only and self.engine.keeps_last:
            feeds[names.LOGITS_TO_KEEP] = self.engine.keep_one
        try:
            outs = self.session.run_with_ort_values(self.output_names, feeds, self.run_options)
        except Exception as err:
            raise _decode_error(self.engine, err) from None
        self.past = list(outs[1:])
        self.length = mask.shape[1]
        return outs[0].numpy()

    def feed(self, token_ids: list[int]) -> np.ndarray:
        return self.run(token_ids, last_only=True)[0, -1]

    def close(self) -> None:
        self.past = []
        self._owner = None


class SharedKVState(DecodeState):
    """One sequence on the fast variant, run through an IOBinding that is set up once (on the CPU,
    or on the GPU with every buffer but the token, the mask and the logits on the device).

    Each layer's K and V live in one buffer ``[1, kv_heads, capacity, head_dim]`` bound as both
    the past input and the present output: GroupQueryAttention sees one pointer and writes the new
    positions in place, so a step copies no cache and allocates nothing. The capacity starts at the
    first feed rounded up to :data:`KV_BLOCK` and doubles (new buffers, ``length`` positions
    copied) when a feed would pass it, never beyond the model's context. LoRA inputs are fixed for
    a state and bound once; the logits land in a preallocated buffer, reused while its shape holds.
    On the GPU the KV buffers are device memory (growth copies them through the host, once per
    doubling), and the LoRA values are the engine's device copies.
    """

    def __init__(self, engine: OnnxEngine, choice: _Choice):
        ort = engine._ort
        self.engine, self.session, self.gpu = engine, choice.session, engine.gpu
        self._owner = choice.owner  # the adapter reader whose memory the bound LoRA values point into
        self.binding = choice.session.io_binding()
        with DEVICE_LOCK if self.gpu else contextlib.nullcontext():
            for name, value in choice.lora.items():
                self.binding.bind_ortvalue_input(name, value)
        self.length = self.capacity = 0
        self.cache: list = []  # K0, V0, K1, V1, ...: numpy arrays, or device OrtValues on the GPU
        self.logits: np.ndarray | None = None  # the bound output buffer
        self._token = np.zeros((1, 1), np.int64)  # a one-token feed is written here, bound once
        self._token_value = ort.OrtValue.ortvalue_from_numpy(self._token)
        self._ids_bound = 0  # how many ids the bound input_ids holds
        self._keep = None  # the bound logits_to_keep value
        self._mask = engine.mask_ones.ctypes.data  # masks are [1, total] views of it, bound by pointer
        self.added, self.width = _logit_columns(engine, choice)  # new-token rows fed, and the logits' width

    def run(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        """Run ``token_ids`` after the cached ones; returns logits ``[1, len(token_ids), vocab]``
        (``[1, 1, vocab]`` with ``last_only``). The array is the bound output buffer: the next
        run overwrites it, so copy what must outlive that."""
        with (
            DEVICE_LOCK if self.gpu else contextlib.nullcontext()
        ):  # binding a host value copies it to the device
            return self._run(token_ids, last_only)

    def _run(self, token_ids: list[int], last_only: bool) -> np.ndarray:
        engine, n = self.engine, len(token_ids)
        total = self.length + n
        if total > self.capacity:
            self._reserve(total)
        self._bind_ids(token_ids)
        self.binding.bind_input(names.ATTENTION_MASK, "cpu", 0, np.int64, [1, total], self._mask)
        self._bind_logits(1 if last_only and engine.keeps_last else n, last_only)
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as err:
            raise _decode_error(engine, err) from None
        self.length = total  # positions past it that a failed run wrote are overwritten next time
        return self.logits

    def feed(self, token_ids: list[int]) -> np.ndarray:
        # a copy (~4 us for a 49k vocab): callers may keep the logits of several steps
        return self.run(token_ids, last_only=True)[0, -1].copy()

    def close(self) -> None:
        with DEVICE_LOCK if self.gpu else contextlib.nullcontext():  # device buffers are freed here
            self.binding = self._owner = self.logits = None
            self.cache = []

    def _bind_ids(self, token_ids: list[int]) -> None:
        if self.added:  # new tokens in the set: base ids clamped, and each position's row of the table
            ids = np.asarray([token_ids], dtype=np.int64)
            ids, index = lora_feeds.split_added_ids(ids, self.engine.config.vocab_size)
            value = self.engine._ort.OrtValue.ortvalue_from_numpy
            self.binding.bind_ortvalue_input(names.INPUT_IDS, value(ids))
            self.binding.bind_ortvalue_input(names.ADDED_INDEX, value(index))
            self._ids_bound = 0
            return
        if len(token_ids) == 1 and not self.gpu:
            self._token[0, 0] = token_ids[0]  # ORT reads the bound buffer at run time
            if self._ids_bound != 1:
                self.binding.bind_ortvalue_input(names.INPUT_IDS, self._token_value)
        else:
            ids = np.asarray([token_ids], dtype=np.int64)
            self.binding.bind_ortvalue_input(
                names.INPUT_IDS, self.engine._ort.OrtValue.ortvalue_from_numpy(ids)
            )
        self._ids_bound = len(token_ids)

    def _bind_logits(self, rows: int, last_only: bool) -> None:
        engine = self.engine
        if engine.keeps_last:
            keep = engine.keep_one if last_only else engine.keep_all  # the binding keeps the last value bound
            if keep is not self._keep:
                self.binding.bind_ortvalue_input(names.LOGITS_TO_KEEP, keep)
                self._keep = keep
        if self.logits is None or self.logits.shape[1] != rows:
            self.logits = np.empty((1, rows, self.width), np.float32)
            self.binding.bind_ortvalue_output(
                names.LOGITS, engine._ort.OrtValue.ortvalue_from_numpy(self.logits)
            )

    def _reserve(self, total: int) -> None:
        """Grow the KV buffers to hold ``total`` positions: double, at least the next block."""
        engine, c = self.engine, self.engine.config
        if total > engine.max_context:
            raise EdgeLoraError(
                f"{total} tokens exceed the context of {engine.max_context}", hint="shorten the prompt"
            )
        capacity = min(engine.max_context, max(2 * self.capacity, -(-total // KV_BLOCK) * KV_BLOCK))
        shape = (1, c.num_key_value_heads, capacity, c.head_dim)
        old, self.cache = self.cache, []
        for i, (past, present) in enumerate(engine.cache_names):
            # uninitialized: GroupQueryAttention reads only the positions the mask covers (a test
            # fills the rest with NaN), and zeroing 2048 positions would cost ~2 ms per growth
            if self.gpu:
                value = buffer = self.gpu.empty(shape, np.float32)
                if self.length:
                    host = np.zeros(shape, np.float32)
                    host[:, :, : self.length] = self.gpu.download(old[i])[:, :, : self.length]
                    self.gpu.upload(host, "kv", into=value)
            else:
                buffer = np.empty(shape, np.float32)
                if self.length:
                    buffer[:, :, : self.length] = old[i][:, :, : self.length]
                value = engine._ort.OrtValue.ortvalue_from_numpy(
                    buffer
                )  # the binding keeps it (and the array) alive
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
            self.cache.append(buffer)
        self.capacity = capacity
